//! The HTTP/1.1 server: hyper on a small tokio runtime on its own thread, one task per
//! connection, backend calls on blocking threads so a slow VM action never stalls the others.
//! The control API is served on a Unix socket ([`serve`]); the pod's probes and Prometheus'
//! scrape may also be served on a TCP address ([`serve_probes`]), which answers nothing else.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{watch, Semaphore};

use crate::error::Error;
use crate::routes::{self, MAX_BODY_BYTES};
use crate::socket::{self, SocketFile};
use crate::types::{ApiError, ApiRequest, ApiResponse, ErrorStatus, VmmBackend, VmmPingResponse};

/// Limits of the server. The defaults suit a pod's control socket.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// A connection that has not sent a whole request head within this time (counted from the
    /// end of the previous answer on a kept-alive connection) is closed.
    pub header_read_timeout: Duration,
    /// A request whose body is not complete within this time gets 408.
    pub body_read_timeout: Duration,
    /// Connections served at once; further ones are closed at once.
    pub max_connections: usize,
    /// How long [`ApiServer::shutdown`] waits for answers in flight.
    pub drain_timeout: Duration,
    /// A connection whose client takes in nothing of an answer for this long is closed (a
    /// client that never reads must not keep a connection slot).
    pub write_timeout: Duration,
    /// Requests handed to the VMM at once (each on a blocking thread); one more waits up to
    /// `vmm_call_wait` for one of them to finish, then gets 503. `vmm.ping` never waits.
    pub max_vmm_calls: usize,
    pub vmm_call_wait: Duration,
    /// Answer only `GET /readyz` and `GET /metrics` (a TCP listener anyone in the pod's
    /// network can reach must not control the VM).
    pub probes_only: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            max_connections: 64,
            drain_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(10),
            max_vmm_calls: MAX_BLOCKING_THREADS,
            vmm_call_wait: Duration::from_secs(5),
            probes_only: false,
        }
    }
}

/// A running API server. Dropping it stops it, as [`ApiServer::shutdown`] does.
pub struct ApiServer {
    /// The Unix socket's file, removed at the end; None on TCP.
    socket: Option<SocketFile>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// The Unix socket it listens on (None: a TCP listener).
    pub fn socket_path(&self) -> Option<&Path> {
        self.socket.as_ref().map(|s| s.path.as_path())
    }

    /// Stops accepting, waits (up to [`ServerOptions::drain_timeout`]) for answers in flight,
    /// and removes the socket file.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(socket) = &self.socket {
            socket.remove_file();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Serves the API on `socket` with default limits. Returns once the socket listens.
pub fn serve(socket: &Path, backend: Arc<dyn VmmBackend>) -> Result<ApiServer, Error> {
    serve_with(socket, backend, ServerOptions::default())
}

/// Serves the API on `socket` with the given limits.
pub fn serve_with(
    socket: &Path,
    backend: Arc<dyn VmmBackend>,
    options: ServerOptions,
) -> Result<ApiServer, Error> {
    bind(socket)?.serve_with(backend, options)
}

/// Serves `GET /readyz` (200 `ok` while the VM runs, 503 with the reason otherwise) and `GET
/// /metrics` on the TCP address `addr`, for a kubelet's `httpGet` readiness probe and a
/// Prometheus scrape; every other request gets 404. Returns once it listens.
pub fn serve_probes(addr: SocketAddr, backend: Arc<dyn VmmBackend>) -> Result<ApiServer, Error> {
    bind_probes(addr)?.serve(backend)
}

/// Binds the API's Unix socket (mode 0600) without serving it yet: see [`Listening`].
pub fn bind(socket: &Path) -> Result<Listening, Error> {
    let (listener, file) = socket::bind(socket)?;
    Ok(Listening(Bound::Unix(listener, file)))
}

/// Binds the TCP address of the probes and metrics without serving it yet: see [`Listening`].
pub fn bind_probes(addr: SocketAddr) -> Result<Listening, Error> {
    let bind_error = |source| Error::Bind {
        path: addr.to_string().into(),
        source,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    Ok(Listening(Bound::Tcp(listener, addr)))
}

/// A socket bound and listening but not served yet. Bound before a slow start (a VM's boot),
/// a client that connects meanwhile waits in the backlog for its answer instead of finding no
/// socket; no thread is started until [`Listening::serve`], so those the server starts are
/// made by whichever thread serves (after it gave up its privileges). Dropped unserved, the
/// Unix socket's file is removed.
pub struct Listening(Bound);

enum Bound {
    Unix(std::os::unix::net::UnixListener, SocketFile),
    Tcp(std::net::TcpListener, SocketAddr),
}

impl Listening {
    /// Serves with default limits: the whole API on a Unix socket, the probes on TCP.
    pub fn serve(self, backend: Arc<dyn VmmBackend>) -> Result<ApiServer, Error> {
        self.serve_with(backend, ServerOptions::default())
    }

    /// Serves with the given limits (a TCP listener answers only the probes whatever they say).
    pub fn serve_with(
        self,
        backend: Arc<dyn VmmBackend>,
        options: ServerOptions,
    ) -> Result<ApiServer, Error> {
        let runtime = runtime()?;
        let entered = runtime.enter();
        match self.0 {
            Bound::Unix(listener, file) => {
                let listener =
                    tokio::net::UnixListener::from_std(listener).map_err(|source| Error::Bind {
                        path: file.path.clone(),
                        source,
                    })?;
                let name = file.path.display().to_string();
                drop(entered);
                start(runtime, listener, name, backend, options, Some(file))
            }
            Bound::Tcp(listener, addr) => {
                let listener =
                    tokio::net::TcpListener::from_std(listener).map_err(|source| Error::Bind {
                        path: addr.to_string().into(),
                        source,
                    })?;
                let options = ServerOptions {
                    probes_only: true,
                    ..options
                };
                drop(entered);
                start(runtime, listener, addr.to_string(), backend, options, None)
            }
        }
    }
}

/// The runtime's blocking threads: the VMM calls in flight at most.
const MAX_BLOCKING_THREADS: usize = 8;

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_name("api")
        .on_thread_start(|| vmm::seccomp::apply_or_exit(vmm::seccomp::Kind::Api))
        .enable_io()
        .enable_time()
        .build()
        .map_err(Error::Runtime)
}

/// Runs the accept loop of `listener` on `runtime`'s own thread.
fn start<L: Listener>(
    runtime: tokio::runtime::Runtime,
    listener: L,
    name: String,
    backend: Arc<dyn VmmBackend>,
    options: ServerOptions,
    file: Option<SocketFile>,
) -> Result<ApiServer, Error> {
    let (stop, stopped) = watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("api-server".into())
        .spawn(move || {
            vmm::seccomp::apply_or_exit(vmm::seccomp::Kind::Api);
            runtime.block_on(accept_loop(listener, backend, options, stopped, name));
            runtime.shutdown_timeout(Duration::from_millis(100));
        })
        .map_err(Error::Runtime)?;
    Ok(ApiServer {
        socket: file,
        stop,
        thread: Some(thread),
    })
}

/// A listening socket the server accepts connections on: Unix or TCP.
trait Listener: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn next(&self) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

async fn accept_loop<L: Listener>(
    listener: L,
    backend: Arc<dyn VmmBackend>,
    options: ServerOptions,
    mut stopped: watch::Receiver<bool>,
    name: String,
) {
    let options = Arc::new(options);
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let calls = Arc::new(Semaphore::new(
        options.max_vmm_calls.min(MAX_BLOCKING_THREADS),
    ));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // Title-case header names and an empty reason phrase (`HTTP/1.1 200 \r\n`, valid HTTP):
    // Cloud Hypervisor's own client (ch-remote, its api_client crate) reads the status code
    // as everything after `HTTP/1.1 ` up to the line end, and finds the body only through an
    // exact-case `Content-Length`.
    http.timer(TokioTimer::new())
        .title_case_headers(true)
        .header_read_timeout(options.header_read_timeout)
        .half_close(true)
        .max_buf_size(64 << 10);
    if options.probes_only {
        tracing::info!("readiness and metrics on http://{name}/readyz, /metrics");
    } else {
        tracing::info!("API listening on {name}");
    }
    loop {
        let stream = tokio::select! {
            accepted = listener.next() => match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!("API socket {name}: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                "API socket {name}: {} connections open, refusing another",
                options.max_connections
            );
            continue;
        };
        let backend = backend.clone();
        let opts = options.clone();
        let calls = calls.clone();
        let service = hyper::service::service_fn(move |req| {
            let backend = backend.clone();
            let opts = opts.clone();
            let calls = calls.clone();
            async move { Ok::<_, Infallible>(answer(req, backend, &opts, &calls).await) }
        });
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(options.write_timeout));
        let stream = TokioIo::new(Box::pin(stream));
        let conn = graceful.watch(http.serve_connection(stream, service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("API connection ended: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(options.drain_timeout) => {
            tracing::warn!("API server: answers still in flight at shutdown were dropped");
        }
    }
}

/// One request, start to end.
async fn answer(
    req: Request<Incoming>,
    backend: Arc<dyn VmmBackend>,
    options: &ServerOptions,
    calls: &Arc<Semaphore>,
) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    if path == routes::READYZ && method == "GET" {
        let info = call_vmm(backend, ApiRequest::VmInfo, calls, options, &path).await;
        let (code, body) = routes::readiness(&info);
        return text(code, body);
    }
    if options.probes_only && !(method == "GET" && path == "/metrics") {
        return respond(&Err(ApiError::not_found(format!(
            "only GET {} and GET /metrics are served here; the control API is on the VMM's \
             Unix socket",
            routes::READYZ
        ))));
    }
    // Route first, so a wrong path or method is answered without reading the body.
    let allowed = routes::allowed_method(&path);
    if allowed != Some(method.as_str()) {
        let error = match routes::parse_request(&method, &path, b"") {
            Err(e) => e,
            Ok(_) => ApiError::internal("route check and router disagree (a bug)"),
        };
        let mut response = respond(&Err(error));
        if let Some(allowed) = allowed {
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allowed));
        }
        return response;
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let hinted = req.body().size_hint().lower();
    if let Some(len) = declared
        .into_iter()
        .chain([hinted])
        .find(|&l| l > MAX_BODY_BYTES as u64)
    {
        return respond(&Err(routes::too_large(len)));
    }
    let body = match tokio::time::timeout(
        options.body_read_timeout,
        Limited::new(req.into_body(), MAX_BODY_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return respond(&Err(routes::too_large(MAX_BODY_BYTES as u64 + 1)))
        }
        Ok(Err(e)) => {
            return respond(&Err(ApiError::bad_request(format!(
                "cannot read the request body: {e}"
            ))))
        }
        Err(_) => {
            return respond(&Err(ApiError::new(
                ErrorStatus::RequestTimeout,
                format!(
                    "request body not received within {} ms",
                    options.body_read_timeout.as_millis()
                ),
            )))
        }
    };
    let request = match routes::parse_request(&method, &path, &body) {
        Ok(request) => request,
        Err(e) => return respond(&Err(e)),
    };
    tracing::debug!("API {method} {path}");
    if let ApiRequest::VmmPing = request {
        // This process's own facts: answered even when every VMM call is stuck.
        return respond(&Ok(ApiResponse::Ping(VmmPingResponse::current())));
    }
    respond(&call_vmm(backend, request, calls, options, &path).await)
}

/// Hands `request` to the VMM on a blocking thread, if one of `calls` is free.
async fn call_vmm(
    backend: Arc<dyn VmmBackend>,
    request: ApiRequest,
    calls: &Arc<Semaphore>,
    options: &ServerOptions,
    path: &str,
) -> Result<ApiResponse, ApiError> {
    let waited = tokio::time::timeout(options.vmm_call_wait, calls.clone().acquire_owned());
    let Ok(Ok(call)) = waited.await else {
        return Err(ApiError::new(
            ErrorStatus::Unavailable,
            format!(
                "the VMM is busy: every request slot was taken for {} ms by requests that \
                 have not finished; try again later",
                options.vmm_call_wait.as_millis()
            ),
        ));
    };
    let handled = tokio::task::spawn_blocking(move || {
        let result = backend.handle(request);
        drop(call);
        result
    })
    .await;
    handled.unwrap_or_else(|e| {
        Err(ApiError::internal(format!(
            "the VMM failed while handling {path}: {e}"
        )))
    })
}

/// A plain-text answer.
fn text(code: u16, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

fn respond(result: &Result<crate::types::ApiResponse, ApiError>) -> Response<Full<Bytes>> {
    let (code, body) = routes::encode_response(result);
    let has_body = body.is_some();
    let mut response = Response::new(Full::new(body.map(Bytes::from).unwrap_or_default()));
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(b""));
    if has_body {
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(routes::content_type(result)),
        );
    }
    response
}
