//! Issue 18, finding 9 (part): `/metrics` and `/readyz` can leave the public
//! listener (a listener of their own, or a bearer token), and a client that
//! never finishes its headers does not hold a connection open.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{TestApp, spawn_app_with};

const OPS_TOKEN: &str = "ops-token-for-scrapers";

async fn status(app: &TestApp, url: String, token: Option<&str>) -> u16 {
    let mut request = app.http.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn with_an_ops_listener_the_public_one_no_longer_serves_metrics_or_readiness() {
    let app = spawn_app_with(|s| s.server.ops_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let ops = app.ops_address.clone().expect("the ops listener is bound");
    for path in ["/metrics", "/readyz"] {
        assert_eq!(
            status(&app, format!("{}{path}", app.address), None).await,
            404
        );
        assert_eq!(
            status(&app, format!("{ops}{path}"), None).await,
            200,
            "{path}"
        );
    }
    // Liveness stays where it was, and the ops listener serves nothing else.
    assert_eq!(
        status(&app, format!("{}/healthz", app.address), None).await,
        200
    );
    assert_eq!(
        status(&app, format!("{ops}/api/v1/replicas"), None).await,
        404
    );
    let page = app
        .http
        .get(format!("{ops}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("approval_bridge_"), "{page}");
}

#[tokio::test]
async fn with_an_ops_token_metrics_and_readiness_need_it() {
    let app = spawn_app_with(|s| s.server.ops_token = Some(OPS_TOKEN.to_owned().into())).await;
    for path in ["/metrics", "/readyz"] {
        let url = format!("{}{path}", app.address);
        assert_eq!(status(&app, url.clone(), None).await, 401, "{path}");
        assert_eq!(status(&app, url.clone(), Some("not-the-token")).await, 401);
        assert_eq!(status(&app, url, Some(OPS_TOKEN)).await, 200, "{path}");
    }
    assert_eq!(
        status(&app, format!("{}/healthz", app.address), None).await,
        200
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let app = spawn_app_with(|s| s.server.header_read_timeout_secs = 1).await;
    let address = app.address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\nX-Slow: ")
        .await
        .unwrap();
    // The server closes the connection (with or without a 408) once the
    // timeout passes; without one it would wait for the rest forever. The
    // outer bound only keeps a broken build from hanging the suite.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("the server closed the connection");
    assert!(read.is_ok() || answer.is_empty(), "{read:?}");
    let answer = String::from_utf8_lossy(&answer);
    assert!(!answer.contains("200 OK"), "{answer}");

    // A client that sends its headers in time is served as usual.
    assert_eq!(
        status(&app, format!("{}/healthz", app.address), None).await,
        200
    );
}
