//! The team page in people's words and at people's widths, in headless
//! Chromium through the sandbox: configured names and "you" instead of hex,
//! short addresses whose copy button copies the full one, "1/2 signed"
//! badges, plain statuses with their next step, a failure's message and
//! what to do, relative times with their UTC time, error pages that keep the
//! header, and no page wider than the window at 1366×900 or 390×844. Its
//! screenshots are the ones in `docs/screenshots/`.

use serde_json::{Value, json};

use approval_bridge::sandbox::{OPERATOR_NAME, OWNER_NAMES};

use crate::browser::{Browser, queue_api, request_until, start_sandbox};

/// Whether the page, and every element that scrolls on its own, fits the
/// window's width; what overflows otherwise.
const OVERFLOW: &str = r#"
const width = window.innerWidth;
const wide = [];
if (document.documentElement.scrollWidth > width) wide.push(`page ${document.documentElement.scrollWidth} > ${width}`);
for (const e of document.querySelectorAll("main *")) {
  if (e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflowX !== "visible") {
    wide.push(`${e.tagName}.${e.className} scrolls ${e.scrollWidth} > ${e.clientWidth}`);
  }
  const right = e.getBoundingClientRect().right;
  if (right > width + 1) wide.push(`${e.tagName}.${e.className} ends at ${right}: ${e.textContent.slice(0, 80)}`);
}
return wide.slice(0, 5);
"#;

impl Browser {
    async fn fits(&self, what: &str) {
        let wide = self.js(OVERFLOW).await;
        assert_eq!(wide, json!([]), "{what} is wider than the window");
    }

    async fn size(&self, width: u32, height: u32) {
        self.client.set_window_size(width, height).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_names_people_words_states_and_fits_a_laptop_and_a_phone() {
    let sandbox = start_sandbox().await;
    let base = sandbox.url.to_string();
    let http = reqwest::Client::new();

    // One request the owners must approve, owner 0 (Alice) has signed;
    // one on the full node, which Phala refuses.
    let waiting = queue_api(&sandbox, "prod-2").await;
    let failed = queue_api(&sandbox, "prod-full").await;
    let request = request_until(&sandbox, &waiting, |r| r["status"] == "awaiting_approval").await;
    let hash = request["proposal"]["safe_tx_hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let signed = http
        .post(format!("{base}sandbox/safe/{hash}/sign"))
        .json(&json!({"owner": 0}))
        .send()
        .await
        .unwrap();
    assert!(signed.status().is_success());
    request_until(&sandbox, &waiting, |r| r["proposal"]["confirmations"] == 1).await;
    let refused = request_until(&sandbox, &failed, |r| r["status"] == "failed").await;
    assert_eq!(refused["last_error"]["code"], "ERR-02-005");
    // The API keeps its machine words.
    assert_eq!(request["status"], "awaiting_approval");

    // Owner 1, Bob, reads the list on a laptop.
    let browser = Browser::start("page_words").await;
    browser.size(1366, 900).await;
    browser.dev_login(&base, "owner-1").await;
    browser.open(&format!("{base}replicas")).await;
    let header = browser.text("header").await;
    assert!(
        header.contains(&format!("Signed in as {}", OWNER_NAMES[1])),
        "{header}"
    );
    let row = format!("tr[data-id='{waiting}']");
    let text = browser.wait_for_text(&row, "1/2 signed", 30).await;
    assert!(text.contains("Waiting for the owners"), "{text}");
    assert!(
        text.contains(&format!("waiting for one of you, {}", OWNER_NAMES[2])),
        "{text}"
    );
    assert!(text.contains("API token sandbox"), "{text}");
    // A failed row says what went wrong and what to do, not just a code.
    let failure = browser.text(&format!("tr[data-id='{failed}']")).await;
    assert!(failure.contains("Failed"), "{failure}");
    assert!(failure.contains("no free CVM slots"), "{failure}");
    assert!(
        failure.contains("What to do: Choose another node, or choose Auto"),
        "{failure}"
    );
    assert!(!failure.contains('`'), "{failure}");
    // Plain words: no status of the list is snake_case.
    let badges = browser
        .js("return Array.from(document.querySelectorAll('#rows .badge'), b => b.textContent)")
        .await;
    assert!(
        badges
            .as_array()
            .unwrap()
            .iter()
            .all(|b| !b.as_str().unwrap().contains('_')),
        "{badges}"
    );
    // "Queued at" is on the screen, relative, with its UTC time.
    let time = browser
        .js(&format!(
            "const t = document.querySelector(\"{row} time\");
             const right = t.getBoundingClientRect().right;
             return [t.textContent, t.title, t.getAttribute('datetime'), right <= window.innerWidth]"
        ))
        .await;
    let ago = time[0].as_str().unwrap();
    assert!(ago == "just now" || ago.ends_with(" ago"), "{time}");
    assert!(time[1].as_str().unwrap().ends_with(" UTC"), "{time}");
    assert!(time[2].as_str().unwrap().ends_with('Z'), "{time}");
    assert_eq!(time[3], json!(true), "queued at is off the screen");
    browser.fits("the list at 1366 px").await;
    browser.screenshot("words-replicas-list").await;

    // The request: its status, what happens next, who signed and who is
    // still to sign, by name.
    browser.open(&format!("{base}replicas/{waiting}")).await;
    let status = browser
        .wait_for_text("#status", "Waiting for the owners", 30)
        .await;
    assert!(!status.contains('_'), "{status}");
    let next = browser.text("#next-step").await;
    assert!(
        next.contains("the owners sign in Safe{Wallet}, someone executes it"),
        "{next}"
    );
    let signed_by = browser.text("#live .signed-by").await;
    assert!(signed_by.contains(OWNER_NAMES[0]), "{signed_by}");
    let to_sign = browser.text("#live .to-sign").await;
    assert!(
        to_sign.contains("you") && to_sign.contains(OWNER_NAMES[2]),
        "{to_sign}"
    );
    assert!(
        browser
            .text("#live .proposal h2")
            .await
            .contains("1/2 signed")
    );
    let timeline = browser.text(".timeline").await;
    assert!(timeline.contains("Waiting for a Safe batch"), "{timeline}");
    assert!(!timeline.contains('_'), "{timeline}");
    browser.fits("a request at 1366 px").await;

    // A short address's copy button copies the full one: Bob's own, shown as "you".
    let copied = browser
        .js("window.__copied = null;
             Object.defineProperty(navigator.clipboard, 'writeText',
               {value: text => { window.__copied = text; return Promise.resolve(); }});
             const person = document.querySelector('#live .to-sign .person.you');
             person.querySelector('button.copy').click();
             return [person.querySelector('code.addr').textContent, person.title]")
        .await;
    let bob = sandbox.owners[1].to_checksum(None);
    let short = copied[0].as_str().unwrap();
    assert!(short.contains('…') && short.len() < 20, "{copied}");
    assert_eq!(copied[1], json!(bob));
    let mut got = Value::Null;
    for _ in 0..20 {
        got = browser.js("return window.__copied").await;
        if !got.is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(got, json!(bob), "the copy button copies the full address");

    // The failed request's page.
    browser.open(&format!("{base}replicas/{failed}")).await;
    let failure = browser.wait_for_text("#failure", "What to do", 30).await;
    assert!(failure.contains("no free CVM slots"), "{failure}");
    assert!(!failure.contains("leave node out"), "{failure}");

    // The Safe's queue, by name.
    browser.open(&format!("{base}proposals")).await;
    let queue = browser.wait_for_text("#proposals", "1/2 signed", 30).await;
    assert!(queue.contains(OWNER_NAMES[0]), "{queue}");
    assert!(
        queue.contains("unblocks 1 request: web-prod on prod-2 queued by API token sandbox")
            && !queue.contains("api:sandbox"),
        "{queue}"
    );
    browser.fits("the queue at 1366 px").await;
    browser.screenshot("words-proposal-queue").await;

    // Error pages keep the header: a request that is not there, a page
    // that is not there.
    browser
        .open(&format!("{base}replicas/{}", uuid::Uuid::new_v4()))
        .await;
    let body = browser
        .wait_for_text("main", "no replica request has id", 20)
        .await;
    assert!(body.contains("Not found"), "{body}");
    let header = browser.text("header").await;
    assert!(
        header.contains(OWNER_NAMES[1]) && header.contains("Sign out"),
        "{header}"
    );
    browser.open(&format!("{base}no/such/page")).await;
    browser
        .wait_for_text("main", "There is no page at /no/such/page", 20)
        .await;
    assert!(browser.text("header").await.contains("Sign out"));

    // On a phone, nothing is wider than the screen.
    browser.size(390, 844).await;
    for (path, what, shot) in [
        ("replicas".to_owned(), "the list", "words-replicas-phone"),
        (
            format!("replicas/{waiting}"),
            "a request",
            "words-detail-phone",
        ),
        (format!("replicas/{failed}"), "a failed request", ""),
        (
            "proposals".to_owned(),
            "the queue",
            "words-proposal-queue-phone",
        ),
    ] {
        browser.open(&format!("{base}{path}")).await;
        browser.fits(&format!("{what} at 390 px")).await;
        if !shot.is_empty() {
            browser.screenshot(shot).await;
        }
    }

    browser.finish(sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_error_is_in_the_forms_words_and_error_pages_keep_the_header() {
    let sandbox = start_sandbox().await;
    let base = sandbox.url.to_string();
    let browser = Browser::start("page_words_operator").await;
    browser.size(1366, 900).await;
    browser.dev_login(&base, "operator").await;
    assert!(
        browser.text("header").await.contains(OPERATOR_NAME),
        "the configured name in the header"
    );

    // A form error is worded as the form labels its fields.
    let csrf = browser
        .js("return document.querySelector('meta[name=\"csrf-token\"]').content")
        .await;
    browser
        .js(&format!(
            "const form = document.createElement('form');
             form.method = 'post'; form.action = '/replicas';
             for (const [name, value] of [['csrf', {csrf}], ['source', ' '], ['count', '1']]) {{
               const input = document.createElement('input');
               input.type = 'hidden'; input.name = name; input.value = value; form.append(input);
             }}
             document.body.append(form); form.submit();"
        ))
        .await;
    let error = browser.wait_for_text("main", "Source CVM", 20).await;
    assert!(
        !error.contains('`') && !error.contains("`source`"),
        "{error}"
    );
    assert!(browser.text("header").await.contains("Sign out"));

    // A 403 keeps the header too: an owner may not cancel.
    let id = queue_api(&sandbox, "prod-3").await;
    browser.dev_login(&base, "owner-2").await;
    browser
        .js(&format!(
            "const form = document.createElement('form');
             form.method = 'post'; form.action = '/replicas/{id}/cancel';
             const csrf = document.createElement('input');
             csrf.type = 'hidden'; csrf.name = 'csrf';
             csrf.value = document.querySelector('meta[name=\"csrf-token\"]').content;
             form.append(csrf); document.body.append(form); form.submit();"
        ))
        .await;
    browser
        .wait_for_text("main", "only operators may queue and cancel", 20)
        .await;
    let header = browser.text("header").await;
    assert!(
        header.contains(OWNER_NAMES[2]) && header.contains("read-only"),
        "{header}"
    );

    browser.finish(sandbox).await;
}
