//! The web console, served on the API's listener at `/`: the files of
//! `web/dist/` (built by `web/build.mjs`, committed, so `cargo build` needs
//! no Node) embedded in the binary with their gzip and brotli variants.
//!
//! Hashed names (`/assets/app-HASH.js`) are cached for a year; `index.html`
//! is revalidated on every load (its ETag makes that a 304), so a new
//! binary's console is picked up at the next page load. Any other path that
//! is not the API's is the single-page app's (it routes in the browser), so
//! it gets `index.html`. Every answer carries a strict Content-Security-Policy:
//! only the appliance's own scripts, styles and API, no inline script, no
//! frames, so markup smuggled into a label or a file name cannot run.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// One embedded file and its precompressed variants.
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    /// Quoted strong ETag: a hash of the uncompressed bytes.
    pub etag: &'static str,
    /// Content-hashed name: cached for a year.
    pub immutable: bool,
    pub raw: &'static [u8],
    pub gzip: &'static [u8],
    pub br: &'static [u8],
}

include!("../../web/dist/assets.rs");

/// The policy sent with every console answer.
pub const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Whether `path` is the console's (served without a token: the files are
/// public, the data behind them is not) rather than the API's.
pub fn is_console(path: &str) -> bool {
    !(path == "/v1" || path.starts_with("/v1/") || path == "/metrics" || path == "/health")
}

/// The router's fallback: API paths that matched no route get the API's
/// 404; the rest is the console.
pub async fn fallback(method: Method, uri: Uri, headers: HeaderMap) -> Response {
    respond(&method, uri.path(), &headers)
}

fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

/// Answers one request for the console.
pub fn respond(method: &Method, path: &str, headers: &HeaderMap) -> Response {
    if !is_console(path) {
        return ApiError::not_found(format!("no route for {method} {path}")).into_response();
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = ApiError::new(
            405,
            "method_not_allowed",
            format!("{method} {path}: the console's files are only read (GET)"),
        )
        .into_response();
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let asset = match find(path) {
        Some(a) => a,
        // A missing hashed file is a 404, not the app: a stale page asking
        // for an old bundle must not get HTML as JavaScript.
        None if path.starts_with("/assets/") => {
            return ApiError::not_found(format!("no console file {path}")).into_response()
        }
        None => match find("/index.html") {
            Some(a) => a,
            None => return ApiError::not_found("the console was not built").into_response(),
        },
    };
    let mut r = if none_match(headers, asset.etag) {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let (body, enc) = pick_encoding(headers, asset);
        let mut r = Response::new(Body::from(body));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        if let Some(e) = enc {
            h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(e));
        }
        r
    };
    let h = r.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if asset.immutable {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        }),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

/// `If-None-Match` names this ETag (or `*`).
fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

/// The smallest variant the client accepts: brotli, then gzip, else raw.
fn pick_encoding(headers: &HeaderMap, a: &'static Asset) -> (&'static [u8], Option<&'static str>) {
    let accepts = |name: &str| {
        headers
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|item| {
                let mut parts = item.split(';');
                let coding = parts.next().unwrap_or("").trim();
                let q = parts
                    .filter_map(|p| p.trim().strip_prefix("q="))
                    .filter_map(|q| q.trim().parse::<f32>().ok())
                    .next()
                    .unwrap_or(1.0);
                coding.eq_ignore_ascii_case(name) && q > 0.0
            })
    };
    if accepts("br") && a.br.len() < a.raw.len() {
        (a.br, Some("br"))
    } else if accepts("gzip") && a.gzip.len() < a.raw.len() {
        (a.gzip, Some("gzip"))
    } else {
        (a.raw, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, path: &str, hs: &[(&'static str, &str)]) -> Response {
        let mut h = HeaderMap::new();
        for (k, v) in hs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        respond(&method, path, &h)
    }

    fn hdr(r: &Response, k: header::HeaderName) -> &str {
        r.headers()
            .get(k)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    fn js() -> &'static Asset {
        ASSETS
            .iter()
            .find(|a| a.path.ends_with(".js"))
            .expect("a JS bundle in web/dist")
    }

    async fn body(r: Response) -> Vec<u8> {
        axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec()
    }

    #[test]
    fn index_is_html_revalidated_with_csp() {
        let r = req(Method::GET, "/", &[]);
        assert_eq!(r.status(), 200);
        assert_eq!(hdr(&r, header::CONTENT_TYPE), "text/html; charset=utf-8");
        assert_eq!(hdr(&r, header::CACHE_CONTROL), "no-cache");
        let csp = hdr(&r, header::CONTENT_SECURITY_POLICY);
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"));
        assert!(csp.contains("frame-ancestors 'none'"));
        assert_eq!(hdr(&r, header::X_CONTENT_TYPE_OPTIONS), "nosniff");
    }

    #[tokio::test]
    async fn spa_paths_fall_back_to_index_and_api_paths_do_not() {
        let index = body(req(Method::GET, "/", &[])).await;
        let r = req(Method::GET, "/volumes/db/snapshots", &[]);
        assert_eq!(r.status(), 200);
        assert_eq!(body(r).await, index);
        let r = req(Method::GET, "/v1/nothing-here", &[]);
        assert_eq!(r.status(), 404);
        assert_eq!(hdr(&r, header::CONTENT_TYPE), "application/json");
        assert!(String::from_utf8(body(r).await)
            .unwrap()
            .contains("no route for GET /v1/nothing-here"));
        let r = req(Method::GET, "/assets/app-GONE.js", &[]);
        assert_eq!(r.status(), 404);
        let r = req(Method::POST, "/volumes", &[]);
        assert_eq!(r.status(), 405);
        assert_eq!(hdr(&r, header::ALLOW), "GET, HEAD");
    }

    #[tokio::test]
    async fn hashed_assets_are_immutable_typed_and_compressed() {
        let a = js();
        let r = req(Method::GET, a.path, &[]);
        assert_eq!(r.status(), 200);
        assert_eq!(
            hdr(&r, header::CONTENT_TYPE),
            "text/javascript; charset=utf-8"
        );
        assert!(hdr(&r, header::CACHE_CONTROL).contains("immutable"));
        assert_eq!(hdr(&r, header::CONTENT_ENCODING), "");
        assert_eq!(body(r).await, a.raw);
        let r = req(
            Method::GET,
            a.path,
            &[("accept-encoding", "gzip, deflate, br")],
        );
        assert_eq!(hdr(&r, header::CONTENT_ENCODING), "br");
        assert_eq!(hdr(&r, header::VARY), "Accept-Encoding");
        assert_eq!(body(r).await, a.br);
        let r = req(Method::GET, a.path, &[("accept-encoding", "gzip, br;q=0")]);
        assert_eq!(hdr(&r, header::CONTENT_ENCODING), "gzip");
        assert_eq!(body(r).await, a.gzip);
        let css = ASSETS.iter().find(|a| a.path.ends_with(".css")).unwrap();
        let r = req(Method::GET, css.path, &[]);
        assert_eq!(hdr(&r, header::CONTENT_TYPE), "text/css; charset=utf-8");
    }

    #[tokio::test]
    async fn etag_gives_304() {
        let a = js();
        let r = req(Method::GET, a.path, &[]);
        let etag = hdr(&r, header::ETAG).to_string();
        assert_eq!(etag, a.etag);
        let r = req(Method::GET, a.path, &[("if-none-match", &etag)]);
        assert_eq!(r.status(), 304);
        assert!(body(r).await.is_empty());
        let r = req(Method::GET, a.path, &[("if-none-match", "\"other\"")]);
        assert_eq!(r.status(), 200);
    }

    #[test]
    fn embedded_files_are_what_web_dist_holds() {
        // The table and the files beside it come from one build.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../web/dist");
        for a in ASSETS {
            let on_disk = std::fs::read(format!("{dir}{}", a.path)).unwrap();
            assert_eq!(on_disk, a.raw, "{}", a.path);
        }
        assert!(find("/index.html").is_some());
    }
}
