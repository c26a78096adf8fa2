//! Logs and traces.
//!
//! - **Logs**: readable lines on a terminal (`LOG_FORMAT=pretty`), one flat JSON object per
//!   line in production (`LOG_FORMAT=json`), filtered by `RUST_LOG` (default `info`). A JSON
//!   line carries the fields of every span it is in at the top level, so each line of a
//!   worker's event has `subscription_id`, `operation_id`, `correlation_id` and `trace_id`
//!   without a collector having to dig into nested spans. Field names are stable.
//! - **Traces**: every span is an OpenTelemetry span. The W3C `traceparent` travels from the
//!   webhook's HTTP request (the caller's, or a new one) through the AMQP headers and the
//!   outbox row to the `traceparent` header of the calls to Microsoft, so the worker's spans
//!   continue the webhook's trace. Spans are exported over OTLP/HTTP (protobuf) only when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the
//!   other standard `OTEL_*` variables (service name, sampler, headers) apply as usual.

use std::collections::HashMap;
use std::fmt;
use std::io::IsTerminal;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{
    self as log_fmt, FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter,
};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

use crate::settings::LogFormat;

/// The W3C header (and AMQP header) name.
pub const TRACEPARENT: &str = "traceparent";

/// The tracer provider of the process: exporting when OTLP is configured.
static PROVIDER: OnceLock<(SdkTracerProvider, bool)> = OnceLock::new();

/// Installs the global subscriber once, as service `fulfillment`; later calls (tests) are
/// no-ops.
pub fn init(format: LogFormat) {
    init_service(format, "fulfillment", DEFAULT_FILTER);
}

/// The log filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info";

/// Installs the global subscriber once: logs in `format` filtered by `RUST_LOG` or else by
/// `default_filter` (directives in `RUST_LOG`'s syntax), spans to OpenTelemetry (exported
/// when OTLP is configured, under `OTEL_SERVICE_NAME` or else `service`). Call [`shutdown`]
/// before the process exits so the last spans are exported. Must not run inside a tokio
/// runtime (the OTLP exporter's blocking HTTP client refuses that).
pub fn init_service(format: LogFormat, service: &str, default_filter: &str) {
    if PROVIDER.get().is_some() {
        return;
    }
    let (provider, exporting, problem) = tracer_provider(service);
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(otel_layer(&provider))
        // Colours only on a terminal: a log file or a pipe gets plain text, which `grep`
        // and a test's `contains` find.
        .with(log_layer(
            format,
            std::io::stderr,
            std::io::stderr().is_terminal(),
        ))
        .try_init()
        .is_ok();
    if installed {
        let _ = PROVIDER.set((provider, exporting));
        if let Some(problem) = problem {
            tracing::warn!(%problem, "OpenTelemetry export is off: the OTLP exporter cannot be built");
        } else if exporting {
            tracing::info!("exporting traces over OTLP");
        }
    }
}

/// Exports the spans still buffered and stops the exporter. Blocking: call it after the
/// runtime ended (or from `spawn_blocking`).
pub fn shutdown() {
    if let Some((provider, true)) = PROVIDER.get()
        && let Err(error) = provider.shutdown()
    {
        eprintln!("warning: could not export the last spans: {error}");
    }
}

/// Whether an OTLP endpoint is configured through the standard variables.
fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|var| std::env::var(var).is_ok_and(|v| !v.trim().is_empty()))
}

/// The provider, whether it exports, and why it does not when it should.
fn tracer_provider(service: &str) -> (SdkTracerProvider, bool, Option<String>) {
    use opentelemetry_sdk::Resource;
    if !otlp_configured() {
        // No processor: spans get real ids (for propagation and logs) and are dropped.
        return (SdkTracerProvider::builder().build(), false, None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build();
    match exporter {
        Ok(exporter) => {
            let mut resource = Resource::builder();
            if std::env::var("OTEL_SERVICE_NAME").is_err() {
                resource = resource.with_service_name(service.to_string());
            }
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.build())
                .build();
            (provider, true, None)
        }
        Err(error) => (
            SdkTracerProvider::builder().build(),
            false,
            Some(error.to_string()),
        ),
    }
}

fn otel_layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S> + use<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("marketplace-fulfillment"))
        .with_threads(false)
        .with_tracked_inactivity(false)
}

/// The log layer for `format`, writing to `writer`; `ansi`: the pretty format colours its
/// output (for a terminal only).
pub fn log_layer<S, W>(
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Json => log_fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .with_writer(writer)
            .boxed(),
        LogFormat::Pretty => log_fmt::layer().with_ansi(ansi).with_writer(writer).boxed(),
    }
}

/// A subscriber like the one [`init_service`] installs, without export, writing logs to
/// `writer`: for tests that look at log lines and trace ids.
pub fn test_subscriber<W>(format: LogFormat, writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let provider = SdkTracerProvider::builder().build();
    tracing_subscriber::registry()
        .with(EnvFilter::new("info"))
        .with(otel_layer(&provider))
        .with(log_layer(format, writer, false))
}

// ---- trace context ---------------------------------------------------------------------

/// Makes `span` continue the trace of `traceparent` (when it is a valid W3C value) and
/// records its trace id in the span's `trace_id` field (declare it `Empty`). Call before the
/// span is first entered. Returns the trace id. Without an OpenTelemetry layer (a test's
/// subscriber) the trace id is still read from `traceparent`.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) -> Option<String> {
    if let Some(traceparent) = traceparent {
        let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.trim().to_string())]);
        let parent = TraceContextPropagator::new().extract(&carrier);
        if parent.span().span_context().is_valid() {
            // Fails only when no OpenTelemetry layer is installed or the span is disabled.
            let _ = span.set_parent(parent);
        }
    }
    let trace_id = trace_id_of(span).or_else(|| traceparent.and_then(trace_id_from_traceparent));
    if let Some(id) = &trace_id {
        span.record("trace_id", id.as_str());
    }
    trace_id
}

/// The OpenTelemetry trace id of `span`, when it has a valid one.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let span_ref = cx.span();
    let context = span_ref.span_context();
    context.is_valid().then(|| context.trace_id().to_string())
}

/// The W3C `traceparent` of the current span (a child of it continues its trace); `None`
/// without an OpenTelemetry layer.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The W3C `traceparent` of `span`.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id_from_traceparent(traceparent: &str) -> Option<String> {
    let id = traceparent.trim().split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id.bytes().any(|b| b != b'0'))
        .then(|| id.to_ascii_lowercase())
}

// ---- flat JSON lines -------------------------------------------------------------------

/// One JSON object per line: `timestamp`, `level`, `target`, the fields of every span in
/// scope (outermost first, so an inner span's value wins), `span` (the innermost span's
/// name), then the event's own fields with `message`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::from(
                OffsetDateTime::now_utc()
                    .format(&Rfc3339)
                    .unwrap_or_default(),
            ),
        );
        line.insert("level".into(), Value::from(metadata.level().as_str()));
        line.insert("target".into(), Value::from(metadata.target()));
        if let Some(scope) = ctx.event_scope() {
            let mut innermost = None;
            for span in scope.from_root() {
                innermost = Some(span.name());
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields) {
                    line.extend(fields);
                }
            }
            if let Some(name) = innermost {
                line.insert("span".into(), Value::from(name));
            }
        }
        event.record(&mut JsonVisitor(&mut line));
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        let value =
            i64::try_from(value).map_or_else(|_| Value::from(value.to_string()), Value::from);
        self.0.insert(field.name().into(), value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        let value =
            u64::try_from(value).map_or_else(|_| Value::from(value.to_string()), Value::from);
        self.0.insert(field.name().into(), value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().into(), Value::from(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::from(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Buffer {
        fn lines(&self) -> Vec<Value> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn json_lines_carry_the_fields_of_every_span_and_the_continued_trace_id() {
        let buffer = Buffer::default();
        let subscriber = test_subscriber(LogFormat::Json, buffer.clone());
        let (outgoing, child) = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "message",
                subscription_id = tracing::field::Empty,
                trace_id = tracing::field::Empty,
                correlation_id = "c-1",
            );
            let trace_id = continue_trace(&span, Some(PARENT));
            assert_eq!(
                trace_id.as_deref(),
                Some("4bf92f3577b34da6a3ce929d0e0e4736")
            );
            let _entered = span.enter();
            span.record("subscription_id", "s-1");
            let inner = tracing::info_span!("call", endpoint = "patch_operation");
            let _inner = inner.enter();
            tracing::info!(status = 200u64, elapsed_ms = 408i128, "answered");
            (current_traceparent(), traceparent_of(&inner))
        });
        let lines = buffer.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert_eq!(line["message"], "answered");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["subscription_id"], "s-1");
        assert_eq!(line["correlation_id"], "c-1");
        assert_eq!(line["endpoint"], "patch_operation");
        assert_eq!(line["status"], 200);
        assert_eq!(line["elapsed_ms"], 408);
        assert_eq!(line["span"], "call");
        // The outgoing traceparent continues the trace under a span of our own.
        let outgoing = outgoing.expect("a traceparent");
        assert_eq!(outgoing, child.unwrap());
        assert!(
            outgoing.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{outgoing}"
        );
        assert!(!outgoing.contains("00f067aa0ba902b7"), "{outgoing}");
        assert!(outgoing.ends_with("-01"), "{outgoing}");
    }

    #[test]
    fn a_span_without_a_parent_starts_a_trace_and_invalid_parents_are_ignored() {
        let subscriber = test_subscriber(LogFormat::Json, Buffer::default());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("message", trace_id = tracing::field::Empty);
            let fresh = continue_trace(&span, Some("00-garbage")).expect("a new trace");
            assert_eq!(fresh.len(), 32);
            assert_ne!(fresh, "4bf92f3577b34da6a3ce929d0e0e4736");
        });
    }

    #[test]
    fn without_an_opentelemetry_layer_the_trace_id_still_comes_from_the_header() {
        let buffer = Buffer::default();
        let subscriber =
            tracing_subscriber::registry().with(log_layer(LogFormat::Json, buffer.clone(), false));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("message", trace_id = tracing::field::Empty);
            assert_eq!(
                continue_trace(&span, Some(PARENT)).as_deref(),
                Some("4bf92f3577b34da6a3ce929d0e0e4736")
            );
            let _entered = span.enter();
            assert_eq!(current_traceparent(), None);
            tracing::info!("applied");
        });
        assert_eq!(
            buffer.lines()[0]["trace_id"],
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn trace_ids_are_read_from_traceparents() {
        assert_eq!(
            trace_id_from_traceparent(PARENT).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id_from_traceparent("garbage"), None);
        assert_eq!(
            trace_id_from_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
    }
}
