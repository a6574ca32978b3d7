//! W3C Trace Context: the `traceparent` a job carries from the request that enqueued it, so that
//! the worker's spans join the caller's trace.

/// The `traceparent` to store with the jobs of a request: the caller's, normalised to version
/// `00`, if it sent a valid one; otherwise a new trace (sampled) rooted here.
pub(crate) fn traceparent_for(header: Option<&str>) -> String {
    header.and_then(parse).unwrap_or_else(generate)
}

/// Parses a `traceparent` header. Versions above `00` are accepted by their first four fields,
/// as the specification asks.
fn parse(header: &str) -> Option<String> {
    let header = header.trim();
    let mut parts = header.split('-');
    let (version, trace_id, parent_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let is_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let all_zero = |s: &str| s.bytes().all(|b| b == b'0');
    if !is_hex(version, 2) || version == "ff" || !is_hex(flags, 2) {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if !is_hex(trace_id, 32) || all_zero(trace_id) || !is_hex(parent_id, 16) || all_zero(parent_id) {
        return None;
    }
    Some(format!("00-{trace_id}-{parent_id}-{flags}"))
}

fn generate() -> String {
    let trace_id: u128 = rand::random::<u128>().max(1);
    let span_id: u64 = rand::random::<u64>().max(1);
    format!("00-{trace_id:032x}-{span_id:016x}-01")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_kept() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(traceparent_for(Some(tp)), tp);
        assert_eq!(
            traceparent_for(Some(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra"
            )),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        );
    }

    #[test]
    fn an_invalid_traceparent_is_replaced_by_a_new_trace() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let tp = traceparent_for(Some(bad));
            assert_ne!(tp, bad);
            assert!(parse(&tp).is_some(), "generated {tp:?} must itself be valid");
        }
    }

    #[test]
    fn generated_traces_differ() {
        assert_ne!(generate(), generate());
    }
}
