DROP TABLE email_directory;
