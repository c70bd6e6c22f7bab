//! Accessibility and the queue form, in a real browser against the sandbox:
//! axe-core (pinned in package.json) on every team page, signed out and
//! signed in as the operator and as an owner, at a laptop's and a phone's
//! width; a keyboard-only pass from the queue form to a cancelled request;
//! and the form's marks, as Phala's Scale dialog gives them: the sources it
//! cannot replicate, what a replica on each node needs, and a refusal that
//! takes the focus and marks its field, with and without JavaScript.

use std::time::Duration;

use fantoccini::Locator;
use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::key::Key;
use serde_json::{Value, json};

use crate::browser::{Browser, queue_source, request_until, start_sandbox};
use crate::wait::{self, Pace};

/// A laptop and a phone.
const WIDTHS: [(u32, u32); 2] = [(1366, 900), (390, 844)];

/// Runs axe and answers its serious and critical violations, one line each.
const RUN_AXE: &str = r#"
const done = arguments[arguments.length - 1];
axe.run(document, {resultTypes: ["violations"]})
  .then(result => done(result.violations
    .filter(v => v.impact === "serious" || v.impact === "critical")
    .map(v => `${v.impact} ${v.id}: ${v.help} (${v.nodes.slice(0, 3).map(n => n.target.join(" ")).join("; ")})`)))
  .catch(err => done([`axe did not run: ${err}`]));
"#;

/// What the focused element is, and whether its focus ring can be seen: an
/// outline of 2 px or more (the browser's own ring is 1 px, easy to miss).
const FOCUS: &str = r##"
const e = document.activeElement;
const style = getComputedStyle(e);
return [e.tagName.toLowerCase() + (e.id ? "#" + e.id : ""),
        style.outlineStyle !== "none" && parseFloat(style.outlineWidth) >= 2];
"##;

fn axe_source() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/node_modules/axe-core/axe.min.js"
    );
    std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("{path}: {err} (npm ci installs the pinned axe-core)"))
}

/// What axe found on the pages checked so far.
struct Audit {
    axe: String,
    found: Vec<String>,
    checked: usize,
}

impl Audit {
    async fn check(&mut self, browser: &Browser, page: &str) {
        self.found.extend(browser.axe(&self.axe, page).await);
        self.checked += 1;
    }
}

impl Browser {
    /// The serious and critical axe violations of the page as it is, at
    /// both widths. axe goes in through WebDriver, which the page's CSP
    /// does not govern, so the CSP stays as it is.
    async fn axe(&self, axe: &str, page: &str) -> Vec<String> {
        self.client.execute(axe, vec![]).await.unwrap();
        let mut found = Vec::new();
        for (width, height) in WIDTHS {
            self.client.set_window_size(width, height).await.unwrap();
            let violations = self.client.execute_async(RUN_AXE, vec![]).await.unwrap();
            for v in violations.as_array().unwrap() {
                found.push(format!("{page} at {width} px: {}", v.as_str().unwrap()));
            }
        }
        found
    }

    /// One key pressed and released, as a keyboard does (WebDriver actions).
    async fn press(&self, key: Key) -> Result<(), fantoccini::error::CmdError> {
        let key: char = key.into();
        let keys = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: key })
            .then(KeyAction::Up { value: key });
        self.client.perform_actions(keys).await
    }

    /// Presses Tab until the focus is on `css`; every element it stops on
    /// on the way is added to `stops`, with whether its focus shows.
    async fn tab_to(&self, css: &str, stops: &mut Vec<(String, bool)>) {
        let is_there = format!(
            "return document.activeElement.matches({})",
            serde_json::to_string(css).unwrap()
        );
        for _ in 0..60 {
            self.press(Key::Tab).await.unwrap();
            let focus = self.js(FOCUS).await;
            stops.push((
                focus[0].as_str().unwrap().to_owned(),
                focus[1].as_bool().unwrap(),
            ));
            if self.js(&is_there).await == json!(true) {
                return;
            }
        }
        panic!("Tab never reached {css}; it stopped on {stops:?}");
    }

    async fn wait_for_path(&self, done: impl Fn(&str) -> bool) -> String {
        let read = || async { self.client.current_url().await.unwrap().path().to_owned() };
        let pace = Pace::every(Duration::from_millis(100), Duration::from_secs(30));
        wait::until_paced(pace, "the path", read, |path| done(path)).await
    }

    async fn attr(&self, css: &str, name: &str) -> Option<String> {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|err| panic!("no {css}: {err}"))
            .attr(name)
            .await
            .unwrap()
    }
}

async fn requests(sandbox: &approval_bridge::sandbox::Sandbox) -> Value {
    reqwest::Client::new()
        .get(format!("{}api/v1/replicas", sandbox.url))
        .bearer_auth(&sandbox.options.api_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_has_no_serious_axe_violation_signed_in_or_out_at_both_widths() {
    let sandbox = start_sandbox().await;
    let base = sandbox.url.to_string();
    // A request waiting for the owners (its detail shows its proposal) and
    // one that failed (its detail shows the error).
    let waiting = queue_source(&sandbox, "web-prod", "prod-2").await;
    let failed = queue_source(&sandbox, "eoa-app", "prod-2").await;
    request_until(&sandbox, &waiting, |r| r["status"] == "awaiting_approval").await;
    request_until(&sandbox, &failed, |r| r["status"] == "failed").await;
    let browser = Browser::start("axe").await;
    let mut audit = Audit {
        axe: axe_source(),
        found: Vec::new(),
        checked: 0,
    };

    // Signed out: the sign-in page, and the page a stale session gets.
    browser.open(&format!("{base}login")).await;
    // First, that the check can fail: a button without a name is critical.
    browser
        .js(
            "const b = document.createElement('button'); b.id = 'nameless';
             document.querySelector('main').append(b);",
        )
        .await;
    let caught = browser.axe(&audit.axe, "a nameless button").await;
    assert!(
        caught.len() == WIDTHS.len() && caught.iter().all(|v| v.contains("critical button-name")),
        "{caught:?}"
    );
    browser
        .js("document.getElementById('nameless').remove()")
        .await;
    audit.check(&browser, "sign-in page").await;
    browser
        .js("document.cookie = 'ab_session=not-a-session; path=/'")
        .await;
    browser.open(&format!("{base}replicas")).await;
    browser.wait_for_text("main", "Sign in again", 10).await;
    audit.check(&browser, "error page, signed out").await;

    for account in ["operator", "owner-0"] {
        browser.dev_login(&base, account).await;
        let pages = [
            ("list", "replicas".to_owned()),
            (
                "request detail with its proposal",
                format!("replicas/{waiting}"),
            ),
            ("failed request detail", format!("replicas/{failed}")),
            ("proposals queue", "proposals".to_owned()),
            ("error page", "replicas/not-a-request".to_owned()),
            // An owner is told it may not queue: an error page too.
            ("queue form", "replicas/new".to_owned()),
        ];
        for (name, path) in pages {
            browser.open(&format!("{base}{path}")).await;
            audit.check(&browser, &format!("{name} ({account})")).await;
        }
        if account != "operator" {
            continue;
        }
        // The form with the browser's refusal shown.
        browser.client.set_window_size(1366, 900).await.unwrap();
        browser.open(&format!("{base}replicas/new")).await;
        browser
            .client
            .find(Locator::Css("#env-name-0"))
            .await
            .unwrap()
            .send_keys("NOT_ALLOWED")
            .await
            .unwrap();
        browser.click("#queue button[type=submit]").await;
        browser
            .wait_for_text("#form-error", "NOT_ALLOWED", 10)
            .await;
        audit
            .check(&browser, "queue form, refused in the browser")
            .await;
        // And with the bridge's refusal: a source the form does not offer,
        // sent by a hand-made form.
        browser.open(&format!("{base}replicas/new")).await;
        browser
            .js("const source = document.getElementById('source');
                 source.querySelector(\"option[value='eoa-app']\").disabled = false;
                 source.value = 'eoa-app'; document.getElementById('queue').submit();")
            .await;
        browser
            .wait_for_text("#form-error", "cannot be replicated", 10)
            .await;
        audit
            .check(&browser, "queue form, refused by the bridge")
            .await;
    }
    println!(
        "axe: {} page states, each at {} widths",
        audit.checked,
        WIDTHS.len()
    );
    assert!(
        audit.found.is_empty(),
        "axe found serious or critical violations:\n{}",
        audit.found.join("\n")
    );

    browser.finish(sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyboard_alone_queues_opens_and_cancels_a_replica_with_the_focus_always_shown() {
    let sandbox = start_sandbox().await;
    let base = sandbox.url.to_string();
    let browser = Browser::start("keyboard").await;
    browser.client.set_window_size(1366, 900).await.unwrap();
    browser.dev_login(&base, "operator").await;
    let mut stops = Vec::new();

    // The form: web-prod (the first source, selected), on prod-2. A closed
    // menu's choice moves with the arrow keys, as on every desktop browser.
    browser.open(&format!("{base}replicas/new")).await;
    browser.tab_to("#source", &mut stops).await;
    assert_eq!(
        browser
            .js("return document.getElementById('source').value")
            .await,
        "web-prod"
    );
    browser.tab_to("#node", &mut stops).await;
    for _ in 0..2 {
        browser.press(Key::Down).await.unwrap();
    }
    assert_eq!(
        browser
            .js("return document.getElementById('node').value")
            .await,
        "prod-2"
    );
    browser
        .tab_to("#queue button[type=submit]", &mut stops)
        .await;
    browser.press(Key::Enter).await.unwrap();
    let path = browser
        .wait_for_path(|p| p.len() == "/replicas/".len() + 36)
        .await;
    let id = path.trim_start_matches("/replicas/").to_owned();
    request_until(&sandbox, &id, |r| r["status"] == "awaiting_approval").await;

    // Its detail, from the list.
    browser.open(&format!("{base}replicas")).await;
    browser
        .tab_to(&format!("#rows a[href='/replicas/{id}']"), &mut stops)
        .await;
    browser.press(Key::Enter).await.unwrap();
    browser.wait_for_path(|p| p == path).await;

    // Cancel, and its confirmation.
    browser.tab_to("#cancel-form button", &mut stops).await;
    // The confirmation opens while the key is down: WebDriver may answer
    // the key press with "unexpected alert open".
    browser.press(Key::Enter).await.ok();
    let mut question = None;
    for _ in 0..50 {
        if let Ok(text) = browser.client.get_alert_text().await {
            question = Some(text);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let question = question.expect("cancelling asks first");
    assert!(question.starts_with("Cancel this request?"), "{question}");
    browser.client.accept_alert().await.unwrap();
    request_until(&sandbox, &id, |r| r["status"] == "cancelled").await;

    let unseen: Vec<&(String, bool)> = stops.iter().filter(|(_, shown)| !shown).collect();
    assert!(
        unseen.is_empty(),
        "focus without a visible ring: {unseen:?}"
    );
    assert!(stops.len() > 5, "{stops:?}");

    browser.finish(sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_form_shows_instances_and_needs_and_marks_the_sources_it_cannot_replicate() {
    let sandbox = start_sandbox().await;
    let base = sandbox.url.to_string();
    let browser = Browser::start("queue_form").await;
    browser.dev_login(&base, "operator").await;
    browser.open(&format!("{base}replicas/new")).await;
    let option = |value: &str| format!("#source option[value='{value}']");

    // The EOA-owned source is shown, marked with the reason, and not offered.
    let eoa = browser.text(&option("eoa-app")).await;
    assert!(
        eoa.contains("cannot be replicated") && eoa.contains("not a Safe"),
        "{eoa}"
    );
    assert_eq!(
        browser
            .attr(&option("eoa-app"), "disabled")
            .await
            .as_deref(),
        Some("true")
    );
    let listed = browser.text("#not-replicable").await;
    assert!(
        listed.contains("eoa-app") && listed.contains("not a Safe"),
        "{listed}"
    );
    // Each source's running instances: its app's CVMs and their nodes.
    let web = browser.text(&option("web-prod")).await;
    assert!(web.contains("1 running: prod-1"), "{web}");
    let api = browser.text(&option("api-prod")).await;
    assert!(api.contains("2 running: prod-1, prod-2"), "{api}");
    assert_eq!(browser.attr(&option("web-prod"), "disabled").await, None);

    // Each node: region, free slots, and what a replica of web-prod needs.
    let node = |value: &str| format!("#node option[value='{value}']");
    let prod_1 = browser.text(&node("prod-1")).await;
    assert!(
        prod_1.contains("region sandbox-1") && prod_1.contains("free slots"),
        "{prod_1}"
    );
    assert!(prod_1.contains("already allowed"), "{prod_1}");
    let prod_2 = browser.text(&node("prod-2")).await;
    assert!(prod_2.ends_with("needs the Safe: addDevice"), "{prod_2}");
    assert!(browser.text(&node("prod-full")).await.contains("full"));
    assert_eq!(
        browser
            .attr(&node("prod-full"), "disabled")
            .await
            .as_deref(),
        Some("true")
    );
    // The canary's compose hash is no longer allowed: every node needs
    // addComposeHash, and a node its app does not know addDevice too.
    browser
        .client
        .find(Locator::Css("#source"))
        .await
        .unwrap()
        .select_by_value("api-canary")
        .await
        .unwrap();
    let prod_2 = browser.text(&node("prod-2")).await;
    assert!(
        prod_2.ends_with("needs the Safe: addComposeHash"),
        "{prod_2}"
    );
    let prod_3 = browser.text(&node("prod-3")).await;
    assert!(
        prod_3.ends_with("needs the Safe: addDevice and addComposeHash"),
        "{prod_3}"
    );

    browser.client.set_window_size(1366, 900).await.unwrap();
    browser.screenshot("queue-form-needs").await;

    // A hand-made form with the EOA source is refused with the reason, and
    // nothing is stored.
    browser
        .js("const source = document.getElementById('source');
             source.querySelector(\"option[value='eoa-app']\").disabled = false;
             source.value = 'eoa-app'; document.getElementById('queue').submit();")
        .await;
    let refusal = browser
        .wait_for_text("#form-error", "cannot be replicated", 10)
        .await;
    assert!(
        refusal.contains("eoa-app") && refusal.contains("not a Safe"),
        "{refusal}"
    );
    assert_eq!(
        browser.attr("#source", "aria-invalid").await.as_deref(),
        Some("true")
    );
    assert!(
        browser
            .attr("#source", "aria-describedby")
            .await
            .unwrap()
            .contains("form-error")
    );
    assert_eq!(requests(&sandbox).await["replicas"], json!([]));

    browser.finish(sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_form_takes_the_focus_and_marks_its_field_with_and_without_javascript() {
    let sandbox = start_sandbox().await;
    let base = sandbox.url.to_string();
    for javascript in [false, true] {
        let browser = Browser::start_with("form_error", javascript).await;
        browser.dev_login(&base, "operator").await;
        // On a phone, where the form is longer than the screen.
        browser.client.set_window_size(390, 844).await.unwrap();
        browser.open(&format!("{base}replicas/new")).await;
        browser
            .client
            .find(Locator::Css("#env"))
            .await
            .unwrap()
            .send_keys("NOT_ALLOWED=1")
            .await
            .unwrap();
        browser.click("#queue button[type=submit]").await;
        // Without JavaScript the bridge refuses it; with it, the browser.
        let message = browser
            .wait_for_text("#form-error", "NOT_ALLOWED", 20)
            .await;
        let focused = browser.client.active_element().await.unwrap();
        assert_eq!(
            focused.attr("id").await.unwrap().as_deref(),
            Some("form-error"),
            "javascript {javascript}: the focus is elsewhere ({message})"
        );
        assert_eq!(
            browser.attr("#env", "aria-invalid").await.as_deref(),
            Some("true")
        );
        assert!(
            browser
                .attr("#env", "aria-describedby")
                .await
                .unwrap()
                .contains("form-error"),
            "javascript {javascript}"
        );
        // The refusal is on the screen.
        let rect = browser
            .js(
                "const r = document.getElementById('form-error').getBoundingClientRect();
                 return r.top >= 0 && r.bottom <= window.innerHeight;",
            )
            .await;
        assert_eq!(
            rect,
            json!(true),
            "javascript {javascript}: the refusal is off screen"
        );
        // And nothing on the phone scrolls sideways.
        let wide = browser
            .js("return Array.from(document.querySelectorAll('body *'))
                   .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1)
                   .map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : ''))")
            .await;
        assert_eq!(
            wide,
            json!([]),
            "javascript {javascript}: wider than the phone"
        );
        browser
            .screenshot(&format!("form-error-js-{javascript}"))
            .await;
        browser.client.clone().close().await.ok();
    }
    assert_eq!(requests(&sandbox).await["replicas"], json!([]));
    sandbox.stop().await.unwrap();
}
