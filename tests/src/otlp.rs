//! A real OTLP trace receiver for tests: a tonic gRPC `TraceService` and an HTTP/1.1
//! `POST /v1/traces` endpoint (protobuf, optionally gzip), both on 127.0.0.1 ephemeral ports,
//! recording every span received, flattened into [`ReceivedSpan`]s.
//!
//! ```no_run
//! # async fn f() {
//! use std::time::Duration;
//! let rx = tests::Receiver::start().await;
//! // point the exporter at rx.grpc_endpoint() or rx.http_endpoint() ...
//! let spans = rx.wait_for(|s| s.len() >= 3, Duration::from_secs(5)).await;
//! assert_eq!(spans[0].service(), Some("frontend"));
//! # }
//! ```
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::codec::CompressionEncoding;

/// How the receiver answers export requests (both transports).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum FailMode {
    /// Accept everything.
    #[default]
    None,
    /// Refuse every request as temporarily unavailable (gRPC `UNAVAILABLE`, HTTP 503): a
    /// collector outage. Nothing is recorded.
    Unavailable,
    /// Refuse the next `n` requests as [`FailMode::Unavailable`], then accept again.
    UnavailableNext(usize),
    /// Throttle every request (gRPC `RESOURCE_EXHAUSTED`, HTTP 429 with `Retry-After: secs`).
    Throttle { retry_after_secs: u32 },
    /// Reject every request as malformed (gRPC `INVALID_ARGUMENT`, HTTP 400): not retryable.
    Reject,
    /// Accept and record, but answer with a partial success rejecting `rejected` spans.
    PartialSuccess { rejected: i64, message: String },
}

/// One span as received, flattened with its Resource. Ids are lowercase hex.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// `""` when the span has no parent.
    pub parent_span_id: String,
    pub name: String,
    /// Proto `SpanKind`: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Values stringified: strings as is, ints decimal, bools `true`/`false`, arrays `[a, b]`.
    pub attributes: BTreeMap<String, String>,
    /// Proto `Status.code`: 0 unset, 1 ok, 2 error (0 when no status was sent).
    pub status_code: i32,
    pub status_message: String,
    /// Resource attributes, stringified like `attributes`.
    pub resource: BTreeMap<String, String>,
    /// Scope name (`InstrumentationScope.name`).
    pub scope: String,
    /// Proto `Span.flags` (low 8 bits: W3C trace flags).
    pub flags: u32,
    pub trace_state: String,
    /// `"grpc"` or `"http"`.
    pub via: &'static str,
}

impl ReceivedSpan {
    pub fn attr(&self, k: &str) -> Option<&str> {
        self.attributes.get(k).map(String::as_str)
    }
    pub fn res(&self, k: &str) -> Option<&str> {
        self.resource.get(k).map(String::as_str)
    }
    /// The Resource's `service.name`.
    pub fn service(&self) -> Option<&str> {
        self.res("service.name")
    }
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}

#[derive(Default)]
struct State {
    spans: Mutex<Vec<ReceivedSpan>>,
    /// Every export request that reached a handler, refused ones included.
    requests: AtomicUsize,
    /// Requests whose spans were recorded.
    accepted: AtomicUsize,
    /// `ResourceSpans` entries received in accepted requests.
    resource_spans: AtomicUsize,
    fail: Mutex<FailMode>,
    /// Headers (gRPC metadata) of the latest request.
    last_headers: Mutex<BTreeMap<String, String>>,
}

enum Verdict {
    Accept(Option<ExportTracePartialSuccess>),
    Unavailable,
    Throttle(u32),
    Reject,
}

impl State {
    fn note_headers(&self, h: &hyper::HeaderMap) {
        *self.last_headers.lock().unwrap() = h
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
    }

    /// Counts the request and decides how to answer it (consuming one `UnavailableNext`).
    fn verdict(&self) -> Verdict {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut fail = self.fail.lock().unwrap();
        match &mut *fail {
            FailMode::None => Verdict::Accept(None),
            FailMode::Unavailable => Verdict::Unavailable,
            FailMode::UnavailableNext(n) => {
                if *n <= 1 {
                    *fail = FailMode::None;
                } else {
                    *n -= 1;
                }
                Verdict::Unavailable
            }
            FailMode::Throttle { retry_after_secs } => Verdict::Throttle(*retry_after_secs),
            FailMode::Reject => Verdict::Reject,
            FailMode::PartialSuccess { rejected, message } => {
                Verdict::Accept(Some(ExportTracePartialSuccess {
                    rejected_spans: *rejected,
                    error_message: message.clone(),
                }))
            }
        }
    }

    fn record(&self, req: ExportTraceServiceRequest, via: &'static str) {
        let flat = flatten(req, via);
        self.accepted.fetch_add(1, Ordering::SeqCst);
        self.resource_spans.fetch_add(flat.1, Ordering::SeqCst);
        self.spans.lock().unwrap().extend(flat.0);
    }
}

/// A running receiver. Dropping it stops both servers.
pub struct Receiver {
    state: Arc<State>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    scheme: &'static str,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Receiver {
    /// Binds `127.0.0.1:0` twice and serves gRPC on one, HTTP/1.1 on the other. Needs a tokio
    /// runtime; the servers run as tasks on it.
    pub async fn start() -> Receiver {
        Self::start_with(None).await
    }

    /// Like [`Receiver::start`], both servers over TLS with the test PKI
    /// ([`crate::pki`]: trust `pki::CA_PEM`); endpoints are `https://127.0.0.1:PORT`.
    pub async fn start_tls() -> Receiver {
        Self::start_with(Some((
            crate::pki::SERVER_CERT_PEM,
            crate::pki::SERVER_KEY_PEM,
        )))
        .await
    }

    /// `tls`: (certificate chain PEM, private key PEM) to serve with.
    pub async fn start_with(tls: Option<(&str, &str)>) -> Receiver {
        let state = Arc::new(State::default());

        let grpc_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind gRPC");
        let grpc_addr = grpc_listener.local_addr().unwrap();
        let svc = TraceServiceServer::new(GrpcService(state.clone()))
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(64 << 20);
        let mut builder = tonic::transport::Server::builder();
        if let Some((cert, key)) = tls {
            builder = builder
                .tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(cert, key)),
                )
                .expect("gRPC TLS config");
        }
        let grpc = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener);
            if let Err(e) = builder.add_service(svc).serve_with_incoming(incoming).await {
                eprintln!("OTLP test receiver: gRPC server stopped: {e}");
            }
        });

        let acceptor = tls.map(|(cert, key)| tls_acceptor(cert, key));
        let http_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind HTTP");
        let http_addr = http_listener.local_addr().unwrap();
        let st = state.clone();
        let http = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = http_listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle_http(st.clone(), req));
                    let conn = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        None => {
                            let _ = conn.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = conn.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                    }
                });
            }
        });

        Receiver {
            state,
            grpc_addr,
            http_addr,
            scheme: if tls.is_some() { "https" } else { "http" },
            tasks: vec![grpc, http],
        }
    }

    /// `http://127.0.0.1:PORT` (`https` with [`Receiver::start_tls`]), for
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` with protocol `grpc`.
    pub fn grpc_endpoint(&self) -> String {
        format!("{}://{}", self.scheme, self.grpc_addr)
    }

    /// `http://127.0.0.1:PORT` (`https` with [`Receiver::start_tls`]): the base, exporters
    /// append `/v1/traces`.
    pub fn http_endpoint(&self) -> String {
        format!("{}://{}", self.scheme, self.http_addr)
    }

    /// Everything received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.state.spans.lock().unwrap().clone()
    }

    /// Polls until `pred(spans)` holds, or `timeout`; returns the last snapshot either way.
    pub async fn wait_for(
        &self,
        pred: impl Fn(&[ReceivedSpan]) -> bool,
        timeout: Duration,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if pred(&spans) || Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Export requests received on both transports, refused ones included.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Export requests whose spans were recorded.
    pub fn accepted_requests(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// `ResourceSpans` entries received in accepted requests (one per process per request when
    /// the exporter groups correctly).
    pub fn resource_spans(&self) -> usize {
        self.state.resource_spans.load(Ordering::SeqCst)
    }

    /// Headers of the latest request (gRPC: its metadata), names lowercase.
    pub fn last_headers(&self) -> BTreeMap<String, String> {
        self.state.last_headers.lock().unwrap().clone()
    }

    /// Changes how the following requests are answered.
    pub fn set_failing(&self, mode: FailMode) {
        *self.state.fail.lock().unwrap() = mode;
    }

    /// Forgets the spans and counters received so far.
    pub fn clear(&self) {
        self.state.spans.lock().unwrap().clear();
        self.state.requests.store(0, Ordering::SeqCst);
        self.state.accepted.store(0, Ordering::SeqCst);
        self.state.resource_spans.store(0, Ordering::SeqCst);
    }
}

struct GrpcService(Arc<State>);

#[tonic::async_trait]
impl TraceService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0
            .note_headers(&request.metadata().clone().into_headers());
        match self.0.verdict() {
            Verdict::Accept(partial_success) => {
                self.0.record(request.into_inner(), "grpc");
                Ok(tonic::Response::new(ExportTraceServiceResponse {
                    partial_success,
                }))
            }
            Verdict::Unavailable => Err(tonic::Status::unavailable("test receiver: unavailable")),
            Verdict::Throttle(_) => Err(tonic::Status::resource_exhausted(
                "test receiver: throttled",
            )),
            Verdict::Reject => Err(tonic::Status::invalid_argument("test receiver: rejected")),
        }
    }
}

fn tls_acceptor(cert: &str, key: &str) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key PEM");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("TLS identity");
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

fn reply(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

async fn handle_http(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if req.uri().path() != "/v1/traces" {
        return Ok(reply(StatusCode::NOT_FOUND, b"not found".to_vec()));
    }
    if req.method() != Method::POST {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, Vec::new()));
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    state.note_headers(req.headers());
    let gzip = header("content-encoding") == "gzip";
    let content_type = header("content-type");
    let Ok(body) = req.into_body().collect().await else {
        return Ok(reply(StatusCode::BAD_REQUEST, b"body read failed".to_vec()));
    };
    let mut body = body.to_bytes().to_vec();
    if gzip {
        let mut out = Vec::new();
        if flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .is_err()
        {
            return Ok(reply(StatusCode::BAD_REQUEST, b"bad gzip".to_vec()));
        }
        body = out;
    }
    if !content_type.starts_with("application/x-protobuf") {
        return Ok(reply(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            b"test receiver only takes application/x-protobuf".to_vec(),
        ));
    }
    let verdict = state.verdict();
    let partial_success = match verdict {
        Verdict::Accept(p) => p,
        Verdict::Unavailable => return Ok(reply(StatusCode::SERVICE_UNAVAILABLE, Vec::new())),
        Verdict::Throttle(secs) => {
            let mut r = reply(StatusCode::TOO_MANY_REQUESTS, Vec::new());
            r.headers_mut()
                .insert("retry-after", secs.to_string().parse().unwrap());
            return Ok(r);
        }
        Verdict::Reject => return Ok(reply(StatusCode::BAD_REQUEST, b"rejected".to_vec())),
    };
    let Ok(msg) = ExportTraceServiceRequest::decode(&body[..]) else {
        return Ok(reply(StatusCode::BAD_REQUEST, b"bad protobuf".to_vec()));
    };
    state.record(msg, "http");
    let mut r = reply(
        StatusCode::OK,
        ExportTraceServiceResponse { partial_success }.encode_to_vec(),
    );
    r.headers_mut()
        .insert("content-type", "application/x-protobuf".parse().unwrap());
    Ok(r)
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

fn stringify(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        None => String::new(),
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => hex(b),
        Some(Value::ArrayValue(a)) => {
            let items: Vec<String> = a
                .values
                .iter()
                .map(|v| stringify(&Some(v.clone())))
                .collect();
            format!("[{}]", items.join(", "))
        }
        Some(Value::KvlistValue(l)) => {
            let items: Vec<String> = l
                .values
                .iter()
                .map(|kv| format!("{}={}", kv.key, stringify(&kv.value)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        #[allow(unreachable_patterns)]
        Some(_) => String::from("?"),
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), stringify(&kv.value)))
        .collect()
}

/// Flattens a request; also returns its number of `ResourceSpans`.
fn flatten(req: ExportTraceServiceRequest, via: &'static str) -> (Vec<ReceivedSpan>, usize) {
    let mut out = Vec::new();
    let n = req.resource_spans.len();
    for rs in req.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| attrs(&r.attributes))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            let scope = ss
                .scope
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            for s in ss.spans {
                let (status_code, status_message) = s
                    .status
                    .as_ref()
                    .map(|st| (st.code, st.message.clone()))
                    .unwrap_or_default();
                out.push(ReceivedSpan {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name,
                    kind: s.kind,
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                    attributes: attrs(&s.attributes),
                    status_code,
                    status_message,
                    resource: resource.clone(),
                    scope: scope.clone(),
                    flags: s.flags,
                    trace_state: s.trace_state,
                    via,
                });
            }
        }
    }
    (out, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
    use std::io::Write as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn kv(k: &str, v: Value) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        }
    }

    fn request() -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", Value::StringValue("svc".into()))],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![0xab; 16],
                        span_id: vec![1, 2, 3, 4, 5, 6, 7, 8],
                        name: "GET".into(),
                        kind: 2,
                        start_time_unix_nano: 10,
                        end_time_unix_nano: 30,
                        flags: 0x301,
                        attributes: vec![
                            kv("http.response.status_code", Value::IntValue(503)),
                            kv("ok", Value::BoolValue(true)),
                        ],
                        status: Some(Status {
                            message: "boom".into(),
                            code: 2,
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    /// Raw HTTP/1.1 POST (gzip), returning the status code.
    async fn post(addr: SocketAddr, body: &[u8]) -> u16 {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(body).unwrap();
        let body = gz.finish().unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n\
             Content-Encoding: gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&body).await.unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.unwrap();
        String::from_utf8_lossy(&resp[9..12]).parse().unwrap()
    }

    #[tokio::test]
    async fn receives_over_grpc_and_http() {
        let rx = Receiver::start().await;
        let mut client = TraceServiceClient::connect(rx.grpc_endpoint())
            .await
            .unwrap()
            .send_compressed(CompressionEncoding::Gzip);
        client.export(request()).await.unwrap();
        assert_eq!(post(rx.http_addr, &request().encode_to_vec()).await, 200);
        let spans = rx.wait_for(|s| s.len() == 2, Duration::from_secs(5)).await;
        assert_eq!(spans.len(), 2);
        assert_eq!((spans[0].via, spans[1].via), ("grpc", "http"));
        let s = &spans[1];
        assert_eq!(s.trace_id, "ab".repeat(16));
        assert_eq!(s.span_id, "0102030405060708");
        assert_eq!(s.parent_span_id, "");
        assert_eq!(s.kind, 2);
        assert_eq!(s.duration_ns(), 20);
        assert_eq!(s.attr("http.response.status_code"), Some("503"));
        assert_eq!(s.attr("ok"), Some("true"));
        assert_eq!((s.status_code, s.status_message.as_str()), (2, "boom"));
        assert_eq!(s.service(), Some("svc"));
        assert_eq!(s.flags, 0x301);
        assert_eq!(
            (rx.requests(), rx.accepted_requests(), rx.resource_spans()),
            (2, 2, 2)
        );

        rx.set_failing(FailMode::UnavailableNext(1));
        let err = client.export(request()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        client.export(request()).await.unwrap();
        rx.set_failing(FailMode::Unavailable);
        assert_eq!(post(rx.http_addr, &request().encode_to_vec()).await, 503);
        rx.set_failing(FailMode::Reject);
        assert_eq!(post(rx.http_addr, &request().encode_to_vec()).await, 400);
        rx.set_failing(FailMode::Throttle {
            retry_after_secs: 3,
        });
        assert_eq!(post(rx.http_addr, &request().encode_to_vec()).await, 429);
        rx.set_failing(FailMode::None);
        assert_eq!(post(rx.http_addr, b"not protobuf").await, 400);
        assert_eq!(rx.spans().len(), 3);
        rx.clear();
        assert_eq!((rx.spans().len(), rx.requests()), (0, 0));
    }

    #[tokio::test]
    async fn grpc_over_tls() {
        let rx = Receiver::start_tls().await;
        assert!(rx.grpc_endpoint().starts_with("https://127.0.0.1:"));
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(crate::pki::CA_PEM));
        let channel = tonic::transport::Endpoint::from_shared(rx.grpc_endpoint())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        TraceServiceClient::new(channel)
            .export(request())
            .await
            .unwrap();
        assert_eq!(rx.spans().len(), 1);
    }
}
