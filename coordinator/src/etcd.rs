//! A thin wrapper over `etcd_client::Client` that bounds every call with a
//! deadline and turns failures into [`Error`]s naming the endpoints, so an
//! unreachable etcd is an error within a known time, never a hang.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use ringleader_security::TlsDir;

use crate::error::{Error, Result};

/// A connected etcd client plus the deadline applied to each call.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    endpoints: String,
    timeout: Duration,
}

impl Etcd {
    /// Connects to `endpoints` and proves the connection with one round trip,
    /// all within `timeout`.
    /// With `tls`, etcd is dialled over TLS (endpoints become `https://`)
    /// with that client certificate, verifying etcd against its CA.
    pub async fn connect(
        endpoints: &[String],
        timeout: Duration,
        tls: Option<&TlsDir>,
    ) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(Error::InvalidArgument("no etcd endpoints given".into()));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(1), timeout);
        let endpoints: Vec<String> = match tls {
            Some(dir) => {
                options = options.with_tls(dir.client_config_by_host());
                endpoints
                    .iter()
                    .map(|e| ringleader_security::tls::uri(e, true))
                    .collect()
            }
            None => endpoints.to_vec(),
        };
        let joined = endpoints.join(",");
        let connect = Client::connect(&endpoints, Some(options));
        let client = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => {
                return Err(Error::Etcd {
                    endpoints: joined,
                    error,
                })
            }
            Err(_) => {
                return Err(Error::EtcdTimeout {
                    endpoints: joined,
                    what: "connect",
                    timeout,
                })
            }
        };
        let etcd = Self {
            client,
            endpoints: joined,
            timeout,
        };
        etcd.call("read the cluster status", |mut c| async move {
            c.status().await
        })
        .await?;
        Ok(etcd)
    }

    /// A clone of the underlying client, for long-lived streams (watch,
    /// observe, keep-alive) whose lifetime the caller bounds itself.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one etcd request with the deadline; `what` names it in errors.
    pub async fn call<T, F, Fut>(&self, what: &'static str, request: F) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.timeout, request(self.client.clone())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(Error::Etcd {
                endpoints: self.endpoints.clone(),
                error,
            }),
            Err(_) => Err(Error::EtcdTimeout {
                endpoints: self.endpoints.clone(),
                what,
                timeout: self.timeout,
            }),
        }
    }
}
