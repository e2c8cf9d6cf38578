//! Ring links between ranks on the same machine, over a Unix domain socket:
//! still gRPC over HTTP/2 through tonic, without the TCP/IP stack or TLS.
//!
//! A worker binds its socket in a fresh private directory (mode 0700,
//! created with `mkdtemp`, so no one else can have prepared it) and
//! registers its path with its machine's id (the kernel's boot id). A rank
//! whose successor registered the same machine id dials that socket; if
//! it cannot, it falls back to TCP.
//!
//! Who may connect: the directory admits only the worker's own user (and
//! root), which on a machine is what a worker certificate says on the
//! network, so the socket's server does not ask for certificates. The ring
//! proof ([`crate::auth`]) is still required on every stream. Frames are not
//! encrypted: they never leave the machine's memory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use ringleader_security::Transport;
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::error::{CollectiveError, Result};
use crate::ring::{server_builder, RingOptions};
use crate::service::CollectiveService;

/// The id ranks compare to know they share a machine: the running
/// kernel's boot id (shared by containers on one host, different across
/// hosts and reboots); `None` where the kernel does not say.
pub fn machine_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty() && id.len() <= 64).then(|| id.to_string())
}

/// A bound Unix socket in its own private directory, removed on drop.
pub struct LocalSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
    /// The private directory [`LocalSocket::bind`] made, removed on drop.
    _dir: Option<tempfile::TempDir>,
}

impl LocalSocket {
    /// Binds `ring.sock` in a new private directory under `parent`.
    pub fn bind(parent: &Path) -> Result<Self> {
        let failed = |what: &str, e: std::io::Error| {
            CollectiveError::Transport(format!("{what} under {}: {e}", parent.display()))
        };
        let dir = tempfile::Builder::new()
            .prefix("ringleader-ring-")
            .tempdir_in(parent)
            .map_err(|e| failed("cannot create a private socket directory", e))?;
        let mut socket = Self::bind_at(&dir.path().join("ring.sock"))?;
        socket._dir = Some(dir);
        Ok(socket)
    }

    /// Binds exactly `path`; its directory's permissions are the caller's
    /// to make private (benchmarks and tests that need known paths).
    pub fn bind_at(path: &Path) -> Result<Self> {
        let listener = UnixListener::bind(path).map_err(|e| {
            CollectiveError::Transport(format!(
                "cannot bind a Unix socket at {}: {e}",
                path.display()
            ))
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            listener: Some(listener),
            _dir: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves `service` on the socket until `shutdown` resolves, with the
    /// ring's tuning and no TLS (see the module docs), to which the caller
    /// may add other services. Call once.
    pub async fn serve(
        &mut self,
        service: &CollectiveService,
        options: &RingOptions,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let listener = self.listener.take().ok_or_else(|| {
            CollectiveError::Transport("the local socket is already served".into())
        })?;
        let local = RingOptions {
            transport: Transport::Insecure,
            ..options.clone()
        };
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            |accepted| accepted.inspect(widen_buffers),
        );
        server_builder(&local)?
            .add_service(service.clone().with_transport(Transport::Insecure))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| CollectiveError::Transport(e.to_string()))
    }
}

/// A channel to the peer service at the Unix socket `path`, tuned like a
/// TCP ring link (see [`crate::ring`]).
pub(crate) async fn dial(
    path: &Path,
    options: &RingOptions,
) -> std::result::Result<Channel, String> {
    // A successor that is still starting may not listen yet: try again for
    // a moment, as the TCP dial does, before the caller falls back to TCP.
    let deadline = tokio::time::Instant::now() + options.timeout.min(UNIX_DIAL_PATIENCE);
    loop {
        match dial_once(path, options).await {
            Ok(channel) => return Ok(channel),
            Err(reason) if tokio::time::Instant::now() >= deadline => return Err(reason),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// How long a Unix socket dial is retried.
const UNIX_DIAL_PATIENCE: Duration = Duration::from_secs(2);

async fn dial_once(path: &Path, options: &RingOptions) -> std::result::Result<Channel, String> {
    let path = path.to_path_buf();
    // The URI is required by the API and unused: the connector ignores it.
    let endpoint = Endpoint::from_static("http://ring.local");
    crate::ring::tune(endpoint, options)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = UnixStream::connect(path).await?;
                widen_buffers(&stream);
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| format!("{e:?}"))
}

/// Unix socket buffer for each end of a ring link: the default (208 KiB)
/// holds a fifth of a chunk, so a 1 MiB chunk took ~5 wake-ups of the
/// reader per write; 4 MiB (Linux's usual `net.core.wmem_max`, the most an
/// unprivileged process may ask for; less is granted where it is lower)
/// lets a chunk cross in one.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

fn widen_buffers(stream: &UnixStream) {
    let socket = socket2::SockRef::from(stream);
    // Best effort: a smaller buffer is slower, not wrong.
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
}
