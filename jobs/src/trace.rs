//! The trace context a job carries: reading the trace id out of its W3C `traceparent`, and
//! attaching a span to the trace that `traceparent` names.
//!
//! Spans always carry the trace id as a `trace_id` field, so log lines (JSON or text) of a
//! request and of its jobs share it with no exporter configured. When the binary exports
//! traces (OTLP, the `otlp` feature), it installs a [`Propagation`] that also makes the
//! `traceparent` the span's OpenTelemetry parent; this crate and its users need no
//! OpenTelemetry dependency for that.

use std::sync::OnceLock;

/// Links spans to remote parents; installed once per process by [`install_propagation`].
pub trait Propagation: Send + Sync + 'static {
    /// Makes the span whose parent is named by `traceparent` (a valid W3C header) its child.
    fn set_parent(&self, span: &tracing::Span, traceparent: &str);
}

static PROPAGATION: OnceLock<Box<dyn Propagation>> = OnceLock::new();

/// Installs the process's [`Propagation`]; returns false if one was installed already.
pub fn install_propagation(propagation: impl Propagation) -> bool {
    PROPAGATION.set(Box::new(propagation)).is_ok()
}

/// Makes `span` a child of the span `traceparent` names, if an exporter asked for it; without
/// one, the shared `trace_id` field is the link.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if let Some(p) = PROPAGATION.get() {
        p.set_parent(span, traceparent);
    }
}

/// The trace id (32 lowercase hex digits) of a `traceparent` of the form `00-<trace id>-…`;
/// the empty string for anything else (jobs enqueued without one, e.g. by the CLI).
pub fn trace_id(traceparent: &str) -> &str {
    match traceparent.split('-').nth(1) {
        Some(id) if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) => id,
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_id_is_the_second_field_of_a_traceparent() {
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(trace_id(""), "");
        assert_eq!(trace_id("00-short-00f067aa0ba902b7-01"), "");
    }
}
