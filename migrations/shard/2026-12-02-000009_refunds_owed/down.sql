DROP TABLE refunds_owed;
