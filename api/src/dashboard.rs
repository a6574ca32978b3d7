//! The operator dashboard at `/dashboard`: plain HTML, CSS and ES modules from `api/dashboard/`,
//! embedded in the binary (no CDN, no build step; it works offline). The page itself holds no
//! data and needs no key; every data call it makes goes to the `/v1` API with the key the
//! operator typed in, kept in the tab's session storage.
//!
//! Assets are served with their content type, a strong `ETag` (their SHA-256) and
//! `Cache-Control: no-cache`, so a browser revalidates each load and an upgraded binary's
//! assets are picked up at once (file names carry no hash). Pages get a Content-Security-Policy
//! that allows only this origin: no inline script or style, nothing from elsewhere.

use poem::{
    Endpoint, Request, Response, Route,
    endpoint::make_sync,
    http::{HeaderValue, Method, StatusCode, header},
};
use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "dashboard/"]
struct Assets;

/// Only this origin, and nothing inline: the dashboard's scripts and styles are files.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                              connect-src 'self'; font-src 'self'; manifest-src 'self'; frame-ancestors 'none'; \
                              base-uri 'none'; form-action 'self'";

/// `/dashboard` (and `/dashboard/`): the page; `/dashboard/<file>`: its assets.
pub(crate) fn endpoint() -> impl Endpoint<Output = Response> + 'static {
    Route::new()
        .at("/", make_sync(|req| asset(&req, "index.html")))
        .at(
            "/*path",
            make_sync(|req: Request| {
                let path = req.raw_path_param("path").unwrap_or_default().to_owned();
                asset(&req, &path)
            }),
        )
}

fn asset(req: &Request, path: &str) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header(header::ALLOW, "GET, HEAD")
            .finish();
    }
    let path = match path.trim_start_matches('/') {
        "" => "index.html",
        p => p,
    };
    let Some(file) = Assets::get(path) else {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .content_type("text/plain; charset=utf-8")
            .body(format!("the dashboard has no file {path:?}\n"));
    };
    let etag = format!("\"{}\"", crate::auth::hex(&file.metadata.sha256_hash()));
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = Response::builder()
        .header(header::ETAG, etag)
        .header(header::CACHE_CONTROL, "no-cache")
        .content_type(content_type(path));
    if path.ends_with(".html") {
        resp = resp.header(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    }
    if fresh {
        return resp.status(StatusCode::NOT_MODIFIED).finish();
    }
    if req.method() == Method::HEAD {
        return resp.header(header::CONTENT_LENGTH, file.data.len()).finish();
    }
    resp.body(file.data.into_owned())
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_file_has_a_known_content_type() {
        let files: Vec<_> = Assets::iter().collect();
        assert!(files.iter().any(|f| f == "index.html"), "{files:?}");
        for f in files {
            assert_ne!(content_type(&f), "application/octet-stream", "{f}");
        }
    }
}
