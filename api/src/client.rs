//! A small blocking client for the API over its Unix socket (what `podvisor ctl` uses). It
//! keeps one HTTP/1.1 connection open across requests.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;

use crate::error::Error;
use crate::routes::API_PREFIX;
use crate::types::ErrorBody;

/// An answer: status and raw body (JSON, or empty for 204).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `error` of an error answer's body, or the body as text.
    pub fn error_message(&self) -> String {
        match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(e) => e.error,
            Err(_) => String::from_utf8_lossy(&self.body).into_owned(),
        }
    }
}

/// A connection to a podvisor API socket.
pub struct Client {
    path: PathBuf,
    runtime: tokio::runtime::Runtime,
    connection: Option<Connection>,
    timeout: Duration,
}

/// A kept-alive connection: hyper's handle, and a duplicate of the socket to check, between
/// requests, whether the server has closed it.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    socket: OwnedFd,
    last_used: Instant,
}

/// A connection idle for less than this is reused without checking the socket (a server closes
/// idle connections after seconds; the check costs tens of µs on some hosts).
const CHECK_AFTER_IDLE: Duration = Duration::from_millis(50);

impl Connection {
    /// Whether it can carry another request: between requests the server sends nothing, so a
    /// readable socket means it was closed (idle timeout, server restart).
    fn usable(&self) -> bool {
        if self.sender.is_closed() {
            return false;
        }
        if self.last_used.elapsed() < CHECK_AFTER_IDLE {
            return true;
        }
        let mut poll = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd on a descriptor we own, zero timeout.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready == 0
    }
}

impl Client {
    /// Connects to `path`.
    pub fn connect(path: &Path) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|source| Error::Connect {
                path: path.to_owned(),
                source,
            })?;
        let mut client = Client {
            path: path.to_owned(),
            runtime,
            connection: None,
            timeout: Duration::from_secs(120),
        };
        client.reconnect()?;
        Ok(client)
    }

    /// How long one request may take (default 120 s: a boot can be slow).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn reconnect(&mut self) -> Result<(), Error> {
        let path = self.path.clone();
        let connect_err = |source| Error::Connect {
            path: path.clone(),
            source,
        };
        let connection = self.runtime.block_on(async {
            let stream = tokio::net::UnixStream::connect(&path)
                .await
                .map_err(connect_err)?;
            let socket = stream.as_fd().try_clone_to_owned().map_err(connect_err)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| connect_err(std::io::Error::other(e)))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok::<_, Error>(Connection {
                sender,
                socket,
                last_used: Instant::now(),
            })
        })?;
        self.connection = Some(connection);
        Ok(())
    }

    /// Sends `method` to `endpoint` (e.g. `vm.info`), with an optional JSON body.
    pub fn request(
        &mut self,
        method: &str,
        endpoint: &str,
        body: Option<&[u8]>,
    ) -> Result<Reply, Error> {
        if !self.connection.as_ref().is_some_and(Connection::usable) {
            self.reconnect()?;
        }
        let path = self.path.clone();
        let fail = |message: String| Error::Request {
            path: path.clone(),
            endpoint: endpoint.to_owned(),
            message,
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{API_PREFIX}{endpoint}"))
            .header(HOST, "localhost");
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
            .map_err(|e| fail(e.to_string()))?;
        let Some(connection) = self.connection.as_mut() else {
            return Err(fail("not connected".into()));
        };
        let sender = &mut connection.sender;
        let timeout = self.timeout;
        let result = self.runtime.block_on(async {
            tokio::time::timeout(timeout, async {
                sender.ready().await?;
                let response = sender.send_request(request).await?;
                let status = response.status().as_u16();
                let body = response.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(Reply {
                    status,
                    body: body.to_vec(),
                })
            })
            .await
        });
        match result {
            Ok(Ok(reply)) => {
                connection.last_used = Instant::now();
                Ok(reply)
            }
            Ok(Err(e)) => {
                self.connection = None;
                Err(fail(e.to_string()))
            }
            Err(_) => {
                self.connection = None;
                Err(fail(format!("no answer within {} s", timeout.as_secs())))
            }
        }
    }
}
