//! RabbitMQ: one connection per process; channels are opened from it by the roles that
//! publish or consume.

use lapin::{Connection, ConnectionProperties};

use crate::config::AmqpSettings;

#[derive(Clone)]
pub struct Amqp {
    conn: std::sync::Arc<Connection>,
}

impl Amqp {
    pub async fn connect(settings: &AmqpSettings) -> Result<Self, lapin::Error> {
        // Auto-recovery reconnects after a broker restart and re-opens channels, consumers
        // and declared topology.
        let props = ConnectionProperties::default()
            .with_connection_name(settings.connection_name.as_str().into())
            .enable_auto_recover();
        let conn = Connection::connect(&settings.url, props).await?;
        Ok(Self {
            conn: std::sync::Arc::new(conn),
        })
    }

    pub fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}
