//! The HTTPS listener, from a client's side: certificates chosen by SNI
//! (rcgen-made CA and leaves), HTTP/2 through ALPN, certificates rotated on
//! disk while an old connection keeps working, a broken file kept out,
//! TLS 1.1 refused, the `https` scheme in forwarding headers and cache
//! keys, and the plain listener's redirect.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A test CA that signs leaf certificates for names.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl Ca {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Larder test CA");
        let cert = params.self_signed(&key).expect("CA cert");
        Self {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf for `names`, as (certificate PEM, key PEM, certificate DER).
    fn leaf(&self, names: &[&str]) -> (String, String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let params = rcgen::CertificateParams::new(
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>(),
        )
        .expect("leaf params");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        let der = CertificateDer::from_pem_slice(self.pem.as_bytes()).expect("CA DER");
        roots.add(der).expect("CA root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|proto| proto.to_vec()).collect();
        Arc::new(config)
    }
}

use rustls::pki_types::pem::PemObject;

/// Writes a certificate and key as `name.crt` / `name.key` in `dir`.
fn write_pair(dir: &Path, name: &str, cert_pem: &str, key_pem: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    // Key first: a watcher that reads between the two writes sees a
    // mismatch and keeps the old pair; the certificate's write reloads it.
    std::fs::write(&key, key_pem).expect("write key");
    std::fs::write(&cert, cert_pem).expect("write cert");
    (cert, key)
}

/// A TLS connection to `addr` asking for `name`.
async fn handshake(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_string()).expect("server name");
    tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
}

/// The leaf certificate (DER) the server presented.
fn presented(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.as_ref().to_vec())
        .expect("a peer certificate")
}

/// An HTTP/1.1 connection over TLS.
async fn http1_over(
    stream: TlsStream<TcpStream>,
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 over TLS");
    tokio::spawn(connection);
    sender
}

async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    host: &str,
    path: &str,
) -> (StatusCode, String) {
    let request = Request::get(path)
        .header("host", host)
        .body(Empty::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn config(origin: &Origin, pairs: &[(PathBuf, PathBuf)], extra: &str) -> String {
    let certificates: String = pairs
        .iter()
        .map(|(cert, key)| {
            format!(
                "    - cert: {}\n      key: {}\n",
                cert.display(),
                key.display()
            )
        })
        .collect();
    format!(
        "{ADMIN_BLOCK}tls:\n  listen: 127.0.0.1:0\n  certificates:\n{certificates}{extra}\
         upstreams:\n  app:\n    servers: [\"{}\"]\n\
         routes:\n  - match: {{ path_prefix: / }}\n    upstream: app\n    cache: {{ enabled: true }}\n",
        origin.url()
    )
}

async fn text_origin() -> Origin {
    start_origin(|request| async move {
        let body = format!("served {}", request.uri().path());
        respond(200, &[("cache-control", "max-age=60")], body)
    })
    .await
}

#[tokio::test]
async fn sni_picks_the_certificate_for_the_name_and_the_first_is_the_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new();
    let (a_pem, a_key, a_der) = ca.leaf(&["a.test"]);
    let (b_pem, b_key, b_der) = ca.leaf(&["*.b.test"]);
    let pairs = [
        write_pair(dir.path(), "a", &a_pem, &a_key),
        write_pair(dir.path(), "b", &b_pem, &b_key),
    ];
    let origin = text_origin().await;
    let larder = start_larder(&config(&origin, &pairs, "")).await;
    let addr = larder.tls_addr.expect("an HTTPS listener");
    let client = ca.client_config(&[b"http/1.1"]);

    let a = handshake(addr, client.clone(), "a.test")
        .await
        .expect("a.test");
    assert_eq!(presented(&a), a_der);
    let b = handshake(addr, client.clone(), "www.b.test")
        .await
        .expect("a name under the wildcard");
    assert_eq!(presented(&b), b_der);

    // A name no certificate covers gets the first one, which the client
    // then refuses for that name.
    let error = handshake(addr, client.clone(), "other.test")
        .await
        .expect_err("no certificate for other.test");
    let shown = format!("{error:?}");
    assert!(
        shown.contains("NotValidForName") && shown.contains("a.test"),
        "{shown}"
    );

    let mut sender = http1_over(a).await;
    assert_eq!(
        get_on(&mut sender, "a.test", "/page").await,
        (StatusCode::OK, "served /page".to_string())
    );
    larder.stop().await;
}

#[tokio::test]
async fn https_requests_are_marked_and_cached_apart_from_plain_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new();
    let (pem, key, _) = ca.leaf(&["localhost"]);
    let pairs = [write_pair(dir.path(), "site", &pem, &key)];
    let origin = text_origin().await;
    let larder = start_larder(&config(&origin, &pairs, "")).await;
    let addr = larder.tls_addr.expect("an HTTPS listener");
    let stream = handshake(addr, ca.client_config(&[]), "localhost")
        .await
        .expect("handshake");
    let mut sender = http1_over(stream).await;
    for _ in 0..2 {
        let (status, _) = get_on(&mut sender, "localhost", "/same").await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(origin.hits(), 1, "the second HTTPS request is a hit");
    let seen = origin.last_request();
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("host"), Some("localhost"));

    // The same host and path over plain HTTP is another URL.
    let plain = get_with(&larder.url("/same"), &[("host", "localhost")]).await;
    assert_eq!(plain.status, 200);
    assert_eq!(origin.hits(), 2, "http:// and https:// are cached apart");
    assert_eq!(
        origin.last_request().header("x-forwarded-proto"),
        Some("http")
    );
    let purged = larder
        .admin(
            "POST",
            "/purge",
            r#"{"url": "https://localhost/same"}"#.to_string(),
        )
        .await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert_eq!(purged.json()["purged"], 1);
    let (status, _) = get_on(&mut sender, "localhost", "/same").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(origin.hits(), 3, "the https:// entry was the one purged");
    get_with(&larder.url("/same"), &[("host", "localhost")]).await;
    assert_eq!(origin.hits(), 3, "the http:// entry is still cached");
    larder.stop().await;
}

#[tokio::test]
async fn alpn_offers_h2_and_requests_are_served_over_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new();
    let (pem, key, _) = ca.leaf(&["localhost"]);
    let pairs = [write_pair(dir.path(), "site", &pem, &key)];
    let origin = text_origin().await;
    let larder = start_larder(&config(&origin, &pairs, "")).await;
    let addr = larder.tls_addr.expect("an HTTPS listener");
    let stream = handshake(addr, ca.client_config(&[b"h2", b"http/1.1"]), "localhost")
        .await
        .expect("handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 over TLS");
    tokio::spawn(connection);
    let mut answers = Vec::new();
    for path in ["/one", "/two", "/three"] {
        let request = Request::get(format!("https://localhost{path}"))
            .body(Empty::<Bytes>::new())
            .expect("request");
        answers.push(sender.send_request(request));
    }
    for (answer, path) in answers.into_iter().zip(["/one", "/two", "/three"]) {
        let response = answer.await.expect("response");
        assert_eq!(response.version(), Version::HTTP_2);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body, format!("served {path}"));
    }
    assert_eq!(
        origin.last_request().header("x-forwarded-proto"),
        Some("https")
    );
    larder.stop().await;
}

#[tokio::test]
async fn a_rotated_certificate_reaches_new_connections_and_a_broken_one_is_kept_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new();
    let (old_pem, old_key, old_der) = ca.leaf(&["localhost"]);
    let pairs = [write_pair(dir.path(), "site", &old_pem, &old_key)];
    let origin = text_origin().await;
    let larder = start_larder(&config(&origin, &pairs, "")).await;
    let addr = larder.tls_addr.expect("an HTTPS listener");
    let client = ca.client_config(&[]);

    let before = handshake(addr, client.clone(), "localhost")
        .await
        .expect("handshake");
    assert_eq!(presented(&before), old_der);
    let mut old_connection = http1_over(before).await;
    assert_eq!(
        get_on(&mut old_connection, "localhost", "/a").await.0,
        StatusCode::OK
    );

    // cert-manager writes a new pair: new connections get it.
    let (new_pem, new_key, new_der) = ca.leaf(&["localhost"]);
    write_pair(dir.path(), "site", &new_pem, &new_key);
    eventually(
        "new connections to present the rotated certificate",
        async || {
            let stream = handshake(addr, client.clone(), "localhost").await.ok()?;
            (presented(&stream) == new_der).then_some(())
        },
    )
    .await;
    // The connection opened before the rotation goes on working.
    assert_eq!(
        get_on(&mut old_connection, "localhost", "/b").await.0,
        StatusCode::OK
    );

    // A broken certificate file: the rotated pair stays in service.
    let failed_loads = || async {
        let metrics = larder.admin("GET", "/metrics", "").await.text();
        metrics
            .lines()
            .find(|line| {
                line.starts_with("larder_tls_certificate_loads_total")
                    && line.contains("result=\"failed\"")
            })
            .and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let failures_before = failed_loads().await;
    std::fs::write(&pairs[0].0, "-----BEGIN CERTIFICATE-----\nbroken\n").expect("break");
    eventually("the broken file to be read and refused", async || {
        failed_loads().await > failures_before
    })
    .await;
    let after = handshake(addr, client.clone(), "localhost")
        .await
        .expect("a handshake with the pair kept");
    assert_eq!(presented(&after), new_der);
    let mut sender = http1_over(after).await;
    assert_eq!(
        get_on(&mut sender, "localhost", "/c").await.0,
        StatusCode::OK
    );
    larder.stop().await;
}

/// A ClientHello offering only TLS 1.1 (version 3.2, no supported_versions
/// extension).
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // no session id
    // Suites rustls serves over TLS 1.2 (ECDHE with AES-GCM), so only the
    // version can be what it refuses.
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]);
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    // signature_algorithms (ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256)
    // and supported_groups (x25519): what a 1.2 handshake would need.
    let extensions = [
        0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04, //
        0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d,
    ];
    body.extend_from_slice(
        &u16::try_from(extensions.len())
            .expect("short")
            .to_be_bytes(),
    );
    body.extend_from_slice(&extensions);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&u16::try_from(body.len()).expect("short").to_be_bytes());
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&u16::try_from(handshake.len()).expect("short").to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn a_client_offering_only_tls_1_1_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new();
    let (pem, key, _) = ca.leaf(&["localhost"]);
    let pairs = [write_pair(dir.path(), "site", &pem, &key)];
    let origin = text_origin().await;
    let larder = start_larder(&config(&origin, &pairs, "")).await;
    let addr = larder.tls_addr.expect("an HTTPS listener");
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(&tls11_client_hello()).await.expect("hello");
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer))
        .await
        .expect("the server ends the connection")
        .expect("read");
    // An alert record (21), fatal (2), protocol_version (70); no ServerHello.
    assert_eq!(answer.first(), Some(&0x15), "{answer:02x?}");
    assert_eq!(answer.get(5..7), Some(&[0x02, 0x46][..]), "{answer:02x?}");
    assert_eq!(origin.hits(), 0);

    // The same server completes a handshake limited to TLS 1.2.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).expect("CA DER"))
        .expect("CA root");
    let tls12 = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .expect("TLS 1.2")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let stream = handshake(addr, Arc::new(tls12), "localhost")
        .await
        .expect("a TLS 1.2 handshake");
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    larder.stop().await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_closed_at_the_header_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new();
    let (pem, key, _) = ca.leaf(&["localhost"]);
    let pairs = [write_pair(dir.path(), "site", &pem, &key)];
    let origin = text_origin().await;
    let yaml = config(&origin, &pairs, "").replace("tls:", "server:\n  header_timeout: 1s\ntls:");
    let larder = start_larder(&yaml).await;
    let addr = larder.tls_addr.expect("an HTTPS listener");
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    // Half a record header, then nothing.
    tcp.write_all(&[0x16, 0x03]).await.expect("write");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection is still open after 5 s");
    larder.stop().await;
}

#[tokio::test]
async fn the_plain_listener_redirects_to_https_except_health() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new();
    let (pem, key, _) = ca.leaf(&["localhost"]);
    let pairs = [write_pair(dir.path(), "site", &pem, &key)];
    let origin = text_origin().await;
    let larder = start_larder(&config(&origin, &pairs, "  redirect_http: true\n")).await;
    let port = larder.tls_addr.expect("an HTTPS listener").port();
    let reply = send(
        "POST",
        &larder.url("/form?x=1"),
        &[("host", "localhost:8080")],
        "field=1",
    )
    .await;
    assert_eq!(reply.status, 308);
    assert_eq!(
        reply.header("location"),
        Some(format!("https://localhost:{port}/form?x=1").as_str())
    );
    assert_eq!(origin.hits(), 0, "the redirected request reached no origin");
    // Load balancers probe the plain port: /health is answered, not
    // redirected (here the catch-all route forwards it).
    let health = get(&larder.url("/health")).await;
    assert_eq!(health.status, 200);
    larder.stop().await;
}

#[test]
fn config_errors_name_the_certificate_and_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new();
    let (pem, _, _) = ca.leaf(&["localhost"]);
    let (_, other_key, _) = ca.leaf(&["localhost"]);
    let (cert, key) = write_pair(dir.path(), "mismatch", &pem, &other_key);
    let missing = dir.path().join("missing.crt");
    let yaml = format!(
        "tls:\n  listen: 127.0.0.1:8443\n  certificates:\n    - cert: {}\n      key: {}\n    - cert: {}\n      key: {}\n",
        cert.display(),
        key.display(),
        missing.display(),
        key.display(),
    );
    let errors = larder::config::load_str(&yaml, "config.yml")
        .expect_err("a key that is not the certificate's, a missing file")
        .0;
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 2, "{shown:#?}");
    assert_eq!(errors[0].path, "tls.certificates[0].key", "{shown:#?}");
    assert_eq!(errors[0].line, Some(5), "{shown:#?}");
    assert!(shown[0].contains("does not belong"), "{shown:#?}");
    assert_eq!(errors[1].path, "tls.certificates[1].cert", "{shown:#?}");
    assert!(shown[1].contains("missing.crt"), "{shown:#?}");

    let empty = larder::config::load_str(
        "tls:\n  listen: 127.0.0.1:8443\n  certificates: []\n",
        "config.yml",
    )
    .expect_err("no certificate");
    assert_eq!(empty.0[0].path, "tls.certificates");
}
