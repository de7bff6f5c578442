//! What a request's transport changes: a request that came over TLS names
//! `https` as its scheme (so the cache keeps `https://` URLs apart from
//! `http://` ones, and `X-Forwarded-Proto` says so), and a plain request on
//! a listener told to redirect gets a redirect to the same URL over HTTPS.
//! Pure functions over a request.

use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri, header};

use crate::http::body::{self, Body};
use crate::http::error::RequestError;

/// Makes the request's target absolute with the `https` scheme, taking the
/// authority from the Host header when the target is in origin form. A
/// request without any host is left alone (`route` has refused it unless
/// it is HTTP/1.0, which has no host to name).
pub fn name_https<B>(request: &mut Request<B>) {
    let uri = request.uri();
    if uri.scheme() == Some(&Scheme::HTTPS) {
        return;
    }
    let authority = match uri.authority() {
        Some(authority) => authority.clone(),
        None => match request
            .headers()
            .get(header::HOST)
            .and_then(|host| Authority::try_from(host.as_bytes()).ok())
        {
            Some(authority) => authority,
            None => return,
        },
    };
    let mut parts = uri.clone().into_parts();
    parts.scheme = Some(Scheme::HTTPS);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(https) = Uri::from_parts(parts) {
        *request.uri_mut() = https;
    }
}

/// A permanent redirect (308, which keeps the method and body) to the same
/// host, path and query on the HTTPS listener's `port` (left out when 443).
pub fn redirect<B>(request: &Request<B>, port: u16) -> Result<Response<Body>, RequestError> {
    let host = super::router::request_host(request)
        .filter(|host| !host.is_empty())
        .ok_or_else(|| RequestError::bad_request("a redirect to HTTPS needs a Host"))?;
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let location = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    Response::builder()
        .status(StatusCode::PERMANENT_REDIRECT)
        .header(header::LOCATION, location)
        .header(header::CONTENT_LENGTH, 0)
        .body(body::empty())
        .map_err(|_| RequestError::bad_request("the request's host and path make no valid URL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, host: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().uri(uri);
        if let Some(host) = host {
            builder = builder.header(header::HOST, host);
        }
        builder.body(()).expect("request")
    }

    #[test]
    fn origin_form_becomes_https_with_the_host() {
        let mut plain = request("/a?b=1", Some("Example.com:8443"));
        name_https(&mut plain);
        assert_eq!(plain.uri(), "https://Example.com:8443/a?b=1");
        let mut absolute = request("http://example.com/x", Some("example.com"));
        name_https(&mut absolute);
        assert_eq!(absolute.uri(), "https://example.com/x");
        let mut hostless = request("/x", None);
        name_https(&mut hostless);
        assert_eq!(hostless.uri(), "/x");
    }

    #[test]
    fn redirects_keep_host_path_and_query() {
        let to = |uri, host, port| {
            let response = redirect(&request(uri, host), port).expect("redirect");
            assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
            response.headers()[header::LOCATION]
                .to_str()
                .expect("ascii")
                .to_string()
        };
        assert_eq!(
            to("/p?q=1", Some("example.com:8080"), 8443),
            "https://example.com:8443/p?q=1"
        );
        assert_eq!(to("/", Some("example.com"), 443), "https://example.com/");
        assert!(redirect(&request("/", None), 443).is_err());
    }
}
