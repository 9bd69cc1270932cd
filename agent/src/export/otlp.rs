//! OTLP transports (tonic gRPC, hyper HTTP/protobuf), failure classification and the retry
//! loop. One request in flight at a time; the body is encoded (and for HTTP compressed) once
//! per batch and reused by retries.
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, EncodeBuf, Encoder};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::config::{Compression, ExportConfig, Protocol, RetryPolicy};
use super::encode::Encoder as SpanEncoder;
use super::{RateLimited, Shutdown};
use crate::metrics::Stats;
use crate::span::Span;

const USER_AGENT: &str = concat!("sonde/", env!("CARGO_PKG_VERSION"));
const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// Requests are split until their encoded size is below this (collectors default to ~4 MiB
/// for gRPC, ~20 MiB for HTTP).
pub(crate) const MAX_REQUEST_BYTES: usize = 3 << 20;

/// What one attempt came to.
#[derive(Debug, PartialEq)]
pub(crate) enum Attempt {
    /// Accepted; `rejected` spans of it refused (partial success).
    Ok { rejected: i64, message: String },
    /// Worth retrying, after `after` if the server said so.
    Retry {
        after: Option<Duration>,
        error: String,
    },
    /// Retrying won't help.
    Fail(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    Success,
    Retryable,
    Permanent,
}

/// OTLP/HTTP: 2xx success; 429, 502, 503, 504 retryable; everything else permanent.
pub(crate) fn classify_http(status: u16) -> Class {
    match status {
        200..=299 => Class::Success,
        429 | 502 | 503 | 504 => Class::Retryable,
        _ => Class::Permanent,
    }
}

/// OTLP/gRPC: the codes the spec lists as retryable (RESOURCE_EXHAUSTED kept simple: retried).
pub(crate) fn classify_grpc(code: tonic::Code) -> Class {
    use tonic::Code::*;
    match code {
        Ok => Class::Success,
        Cancelled | DeadlineExceeded | ResourceExhausted | Aborted | OutOfRange | Unavailable
        | DataLoss => Class::Retryable,
        _ => Class::Permanent,
    }
}

/// `Retry-After` in seconds (HTTP dates are ignored: the backoff applies).
pub(crate) fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Encodes pre-encoded protobuf bytes as is; decodes the response with prost.
#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<ExportTraceServiceResponse>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        Default::default()
    }
}

pub(crate) struct GrpcTransport {
    grpc: tonic::client::Grpc<Channel>,
    metadata: tonic::metadata::MetadataMap,
}

pub(crate) struct HttpTransport {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    uri: http::Uri,
    headers: http::HeaderMap,
    gzip: bool,
}

#[allow(clippy::large_enum_variant)] // one per exporter
pub(crate) enum Transport {
    Grpc(GrpcTransport),
    Http(HttpTransport),
}

impl Transport {
    /// Needs a tokio runtime (the gRPC channel connects lazily, on first use).
    pub(crate) fn new(cfg: &ExportConfig) -> Result<Transport, String> {
        match cfg.protocol {
            Protocol::Grpc => {
                let mut ep = Endpoint::from_shared(cfg.endpoint.clone())
                    .map_err(|e| format!("endpoint {}: {e}", cfg.endpoint))?
                    .connect_timeout(cfg.timeout)
                    .tcp_nodelay(true)
                    .user_agent(USER_AGENT)
                    .map_err(|e| format!("user agent: {e}"))?;
                if cfg.endpoint.starts_with("https:") {
                    let mut tls = ClientTlsConfig::new().with_native_roots();
                    if let Some(ca) = &cfg.ca_certificate {
                        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(&ca.pem));
                    }
                    ep = ep.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
                }
                let mut grpc = tonic::client::Grpc::new(ep.connect_lazy())
                    .accept_compressed(CompressionEncoding::Gzip);
                if cfg.compression == Compression::Gzip {
                    grpc = grpc.send_compressed(CompressionEncoding::Gzip);
                }
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &cfg.headers {
                    let ok = if k.ends_with("-bin") {
                        tonic::metadata::BinaryMetadataKey::from_bytes(k.as_bytes())
                            .map(|key| {
                                metadata.append_bin(
                                    key,
                                    tonic::metadata::BinaryMetadataValue::from_bytes(v.as_bytes()),
                                );
                            })
                            .is_ok()
                    } else {
                        match (
                            tonic::metadata::AsciiMetadataKey::from_bytes(k.as_bytes()),
                            v.parse::<tonic::metadata::AsciiMetadataValue>(),
                        ) {
                            (Ok(key), Ok(val)) => {
                                metadata.append(key, val);
                                true
                            }
                            _ => false,
                        }
                    };
                    if !ok {
                        return Err(format!("header {k:?} is not valid gRPC metadata"));
                    }
                }
                Ok(Transport::Grpc(GrpcTransport { grpc, metadata }))
            }
            Protocol::HttpProtobuf => {
                let uri: http::Uri = cfg
                    .endpoint
                    .parse()
                    .map_err(|e| format!("endpoint {}: {e}", cfg.endpoint))?;
                let tls = super::tls::client_config(
                    cfg.ca_certificate.as_ref().map(|c| c.pem.as_slice()),
                    uri.scheme_str() == Some("https"),
                )?;
                let mut http = HttpConnector::new();
                http.enforce_http(false);
                http.set_nodelay(true);
                http.set_connect_timeout(Some(cfg.timeout));
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(http);
                let client = Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(30))
                    .build(connector);
                let mut headers = http::HeaderMap::new();
                for (k, v) in &cfg.headers {
                    let name = http::HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| format!("invalid header name {k:?}"))?;
                    let value = http::HeaderValue::from_str(v)
                        .map_err(|_| format!("invalid value for header {k:?}"))?;
                    headers.append(name, value);
                }
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/x-protobuf"),
                );
                headers.insert(
                    http::header::USER_AGENT,
                    http::HeaderValue::from_static(concat!("sonde/", env!("CARGO_PKG_VERSION"))),
                );
                let gzip = cfg.compression == Compression::Gzip;
                if gzip {
                    headers.insert(
                        http::header::CONTENT_ENCODING,
                        http::HeaderValue::from_static("gzip"),
                    );
                }
                Ok(Transport::Http(HttpTransport {
                    client,
                    uri,
                    headers,
                    gzip,
                }))
            }
        }
    }

    /// The request body as sent on the wire (gRPC compresses per message itself).
    fn body(&self, encoded: Vec<u8>) -> Bytes {
        match self {
            Transport::Http(h) if h.gzip => {
                let mut enc = flate2::write::GzEncoder::new(
                    Vec::with_capacity(encoded.len() / 4),
                    flate2::Compression::fast(),
                );
                enc.write_all(&encoded).expect("write to Vec");
                Bytes::from(enc.finish().expect("write to Vec"))
            }
            _ => Bytes::from(encoded),
        }
    }

    async fn attempt(&self, body: Bytes, timeout: Duration) -> Attempt {
        match self {
            Transport::Grpc(g) => {
                let mut grpc = g.grpc.clone();
                let fut = async {
                    grpc.ready()
                        .await
                        .map_err(|e| tonic::Status::unavailable(format!("not ready: {e}")))?;
                    let mut req = tonic::Request::new(body);
                    *req.metadata_mut() = g.metadata.clone();
                    req.set_timeout(timeout);
                    grpc.unary(
                        req,
                        http::uri::PathAndQuery::from_static(GRPC_PATH),
                        RawCodec,
                    )
                    .await
                };
                match tokio::time::timeout(timeout, fut).await {
                    Err(_) => Attempt::Retry {
                        after: None,
                        error: format!("timed out after {} ms", timeout.as_millis()),
                    },
                    Ok(Ok(resp)) => ok_attempt(resp.into_inner()),
                    Ok(Err(status)) => {
                        let error = format!("gRPC {:?}: {}", status.code(), status.message());
                        match classify_grpc(status.code()) {
                            Class::Retryable => Attempt::Retry { after: None, error },
                            _ => Attempt::Fail(error),
                        }
                    }
                }
            }
            Transport::Http(h) => {
                let mut req = http::Request::new(Full::new(body));
                *req.method_mut() = http::Method::POST;
                *req.uri_mut() = h.uri.clone();
                *req.headers_mut() = h.headers.clone();
                let fut = async {
                    let resp = h.client.request(req).await.map_err(|e| {
                        // The chain holds the useful part (e.g. "Connection refused").
                        let mut msg = e.to_string();
                        let mut src = std::error::Error::source(&e);
                        while let Some(s) = src {
                            msg += &format!(": {s}");
                            src = s.source();
                        }
                        msg
                    })?;
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get(http::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    Ok::<_, String>((status, retry_after, body))
                };
                match tokio::time::timeout(timeout, fut).await {
                    Err(_) => Attempt::Retry {
                        after: None,
                        error: format!("timed out after {} ms", timeout.as_millis()),
                    },
                    Ok(Err(error)) => Attempt::Retry { after: None, error },
                    Ok(Ok((status, retry_after, body))) => match classify_http(status) {
                        Class::Success => {
                            ok_attempt(ExportTraceServiceResponse::decode(body).unwrap_or_default())
                        }
                        class => {
                            let snippet: String = String::from_utf8_lossy(&body)
                                .chars()
                                .filter(|c| !c.is_control())
                                .take(200)
                                .collect();
                            let error = format!("HTTP {status} {snippet}").trim_end().to_string();
                            if class == Class::Retryable {
                                Attempt::Retry {
                                    after: retry_after,
                                    error,
                                }
                            } else {
                                Attempt::Fail(error)
                            }
                        }
                    },
                }
            }
        }
    }
}

fn ok_attempt(resp: ExportTraceServiceResponse) -> Attempt {
    let p = resp.partial_success.unwrap_or_default();
    Attempt::Ok {
        rejected: p.rejected_spans.max(0),
        message: p.error_message,
    }
}

/// Backoff before retry number `retry` (1-based): `initial * 2^(retry-1)` capped at `max`,
/// times a random factor in [0.5, 1.5).
pub(crate) fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let base = policy
        .initial_backoff
        .saturating_mul(1u32 << (retry.saturating_sub(1)).min(16))
        .min(policy.max_backoff);
    base.mul_f64(rand::random_range(0.5..1.5))
}

pub(crate) struct OtlpExporter {
    transport: Transport,
    timeout: Duration,
    retry: RetryPolicy,
    stats: Arc<Stats>,
    /// "protocol endpoint", for log lines.
    target: String,
    fail_log: RateLimited,
    partial_log: RateLimited,
    encoder: SpanEncoder,
    /// Largest request encoded so far: the next buffer's capacity.
    last_size: usize,
}

impl OtlpExporter {
    pub(crate) fn new(cfg: &ExportConfig, stats: Arc<Stats>) -> Result<Self, String> {
        Ok(OtlpExporter {
            transport: Transport::new(cfg)?,
            timeout: cfg.timeout,
            retry: cfg.retry.clone(),
            stats,
            target: format!("{} {}", cfg.protocol.as_str(), cfg.endpoint),
            fail_log: RateLimited::new(Duration::from_secs(10)),
            partial_log: RateLimited::new(Duration::from_secs(60)),
            encoder: SpanEncoder::default(),
            last_size: 0,
        })
    }

    /// Exports `spans` (split into several requests if too big), retrying as allowed. Every
    /// span ends up counted in `spans_exported` or `spans_export_failed`.
    pub(crate) async fn export(&mut self, spans: &[Span], shutdown: &mut Shutdown) {
        let mut pending = vec![spans];
        while let Some(chunk) = pending.pop() {
            if chunk.is_empty() {
                continue;
            }
            let mut encoded = Vec::with_capacity(self.last_size);
            self.encoder.encode(chunk, &mut encoded);
            self.last_size = self.last_size.max(encoded.len());
            if encoded.len() > MAX_REQUEST_BYTES && chunk.len() > 1 {
                let (a, b) = chunk.split_at(chunk.len() / 2);
                pending.push(b);
                pending.push(a);
                continue;
            }
            let body = self.transport.body(encoded);
            self.send(body, chunk.len() as u64, shutdown).await;
        }
    }

    async fn send(&mut self, body: Bytes, n: u64, shutdown: &mut Shutdown) {
        let start = Instant::now();
        let budget_end = start + self.retry.budget;
        let end = |shutdown: &Shutdown| match shutdown.deadline() {
            Some(d) => d.min(budget_end),
            None => budget_end,
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let now = Instant::now();
            let remaining = end(shutdown).saturating_duration_since(now);
            if remaining.is_zero() {
                self.give_up(n, "deadline reached before the request could be sent");
                return;
            }
            Stats::inc(&self.stats.export_requests);
            let result = self
                .transport
                .attempt(body.clone(), self.timeout.min(remaining))
                .await;
            match result {
                Attempt::Ok { rejected, message } => {
                    let rejected = (rejected as u64).min(n);
                    Stats::add(&self.stats.spans_exported, n - rejected);
                    if rejected > 0 {
                        Stats::add(&self.stats.spans_export_failed, rejected);
                    }
                    if rejected > 0 || !message.is_empty() {
                        self.partial_log.warn(|| {
                            format!(
                                "OTLP export: collector rejected {rejected} of {n} spans: {message}"
                            )
                        });
                    }
                    if attempt > 1 {
                        log::debug!("OTLP export succeeded after {attempt} attempts");
                    }
                    return;
                }
                Attempt::Fail(error) => {
                    self.give_up(n, &format!("{error} (not retryable)"));
                    return;
                }
                Attempt::Retry { after, error } => {
                    if attempt >= self.retry.max_attempts {
                        self.give_up(n, &format!("{error} (after {attempt} attempts)"));
                        return;
                    }
                    let wait = after.unwrap_or_else(|| backoff(&self.retry, attempt));
                    if Instant::now() + wait > end(shutdown) {
                        self.give_up(
                            n,
                            &format!("{error} (no time left to retry in {} ms)", wait.as_millis()),
                        );
                        return;
                    }
                    Stats::inc(&self.stats.export_retries);
                    log::debug!(
                        "OTLP export attempt {attempt} failed: {error}; retrying in {} ms",
                        wait.as_millis()
                    );
                    let until = Instant::now() + wait;
                    // Sleep, but wake up if shutdown begins: its deadline may be sooner.
                    loop {
                        let shutting_down = tokio::select! {
                            _ = tokio::time::sleep_until(until.into()) => false,
                            _ = shutdown.changed() => true,
                        };
                        if !shutting_down {
                            break;
                        }
                        if until > end(shutdown) {
                            self.give_up(n, &format!("{error} (shutting down)"));
                            return;
                        }
                    }
                }
            }
        }
    }

    fn give_up(&mut self, n: u64, why: &str) {
        Stats::add(&self.stats.spans_export_failed, n);
        let target = &self.target;
        self.fail_log
            .warn(|| format!("OTLP export of {n} spans to {target} failed: {why}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_classification() {
        assert_eq!(classify_http(200), Class::Success);
        assert_eq!(classify_http(202), Class::Success);
        for s in [429, 502, 503, 504] {
            assert_eq!(classify_http(s), Class::Retryable, "{s}");
        }
        for s in [400, 401, 403, 404, 405, 413, 415, 500, 501] {
            assert_eq!(classify_http(s), Class::Permanent, "{s}");
        }
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn grpc_classification() {
        use tonic::Code;
        for c in [
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::Cancelled,
            Code::OutOfRange,
            Code::DataLoss,
        ] {
            assert_eq!(classify_grpc(c), Class::Retryable, "{c:?}");
        }
        for c in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::NotFound,
            Code::Unimplemented,
            Code::Internal,
            Code::Unknown,
            Code::FailedPrecondition,
            Code::AlreadyExists,
        ] {
            assert_eq!(classify_grpc(c), Class::Permanent, "{c:?}");
        }
        assert_eq!(classify_grpc(Code::Ok), Class::Success);
    }

    #[test]
    fn backoff_grows_capped_with_jitter() {
        let p = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            budget: Duration::from_secs(30),
        };
        for _ in 0..100 {
            let b1 = backoff(&p, 1);
            assert!(b1 >= Duration::from_millis(50) && b1 < Duration::from_millis(150));
            let b2 = backoff(&p, 2);
            assert!(b2 >= Duration::from_millis(100) && b2 < Duration::from_millis(300));
            let b9 = backoff(&p, 40);
            assert!(b9 >= Duration::from_millis(175) && b9 < Duration::from_millis(525));
        }
    }
}
