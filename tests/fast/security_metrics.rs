//! Issue "The Safe approves exactly what was asked", finding 2: `/metrics`
//! cannot be made to grow by anonymous requests.

use crate::helpers::spawn_app;

#[tokio::test]
async fn junk_methods_add_no_metric_series() {
    let app = spawn_app().await;
    for n in 0..300 {
        let method = reqwest::Method::from_bytes(format!("JUNK{n:04}X").as_bytes()).unwrap();
        app.http
            .request(method, format!("{}/api/v1/replicas", app.address))
            .send()
            .await
            .unwrap();
    }
    let metrics = app.metrics().await;
    assert!(!metrics.contains("JUNK"), "a junk method became a label");
    let other: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("approval_bridge_http_requests_total") && l.contains("method=\"other\"")
        })
        .collect();
    assert!(!other.is_empty(), "{metrics}");
}
