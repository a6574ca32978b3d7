//! The process's logs and traces: `tracing` to stderr as text, or JSON when
//! `DROVER_LOG_FORMAT=json`, filtered by `DROVER_LOG`; with the `otlp` feature and
//! `DROVER_OTLP_ENDPOINT` set, spans are also exported over OTLP/HTTP, and the `traceparent`s
//! of requests and jobs become their spans' OpenTelemetry parents (see `jobs::trace`).

use tracing_subscriber::{EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt};

/// Flushes exported spans when dropped; hold it until `main` returns.
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("flushing exported traces failed: {error}");
        }
    }
}

/// Installs the process's subscriber. Call once, first thing in `main`.
pub fn init() -> Telemetry {
    let filter = EnvFilter::try_from_env("DROVER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("DROVER_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let logs = if json {
        // Each line carries the fields of its span and of the spans around it: a job's line
        // has the job's id, kind, queue, attempt and trace id.
        fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed()
    } else {
        fmt::layer().boxed()
    };
    let endpoint = std::env::var("DROVER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty());
    #[cfg(feature = "otlp")]
    {
        let (provider, export) = match endpoint.as_deref().map(otlp::layer) {
            Some(Ok((provider, layer))) => (Some(provider), Some(layer)),
            Some(Err(error)) => {
                eprintln!("DROVER_OTLP_ENDPOINT: not exporting traces: {error}");
                (None, None)
            }
            None => (None, None),
        };
        tracing_subscriber::registry()
            .with(filter)
            .with(logs)
            .with(export)
            .init();
        if provider.is_some() {
            jobs::trace::install_propagation(otlp::W3c);
        }
        Telemetry { provider }
    }
    #[cfg(not(feature = "otlp"))]
    {
        tracing_subscriber::registry().with(filter).with(logs).init();
        if endpoint.is_some() {
            tracing::warn!(
                "DROVER_OTLP_ENDPOINT is set but this drover was built without the `otlp` feature: no traces are exported"
            );
        }
        Telemetry {}
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry::{propagation::TextMapPropagator, trace::TracerProvider as _};
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// The exporting layer, batching spans to the OTLP/HTTP collector at `endpoint`
    /// (`http://collector:4318/v1/traces`): the spans `DROVER_LOG` enables.
    pub(super) fn layer<S>(
        endpoint: &str,
    ) -> Result<(SdkTracerProvider, impl tracing_subscriber::Layer<S>), opentelemetry_otlp::ExporterBuildError>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .build()?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name("drover").build())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("drover"));
        Ok((provider, layer))
    }

    /// W3C Trace Context: a `traceparent` becomes the span's remote parent.
    pub(super) struct W3c;

    impl jobs::trace::Propagation for W3c {
        fn set_parent(&self, span: &tracing::Span, traceparent: &str) {
            let carrier =
                std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
            let parent = TraceContextPropagator::new().extract(&carrier);
            let _ = span.set_parent(parent);
        }
    }
}
