//! `approval-bridge doctor` against the sandbox's world: a table of checks,
//! exit code 0 when all pass, 1 with a clear row when one fails.

use crate::command::bridge;
use crate::helpers::fresh_database;
use crate::processes::WorldProcess;

fn doctor(
    world: &WorldProcess,
    database_url: &str,
    overrides: &[(&str, &str)],
) -> (i32, String, String) {
    let output = bridge()
        .arg("doctor")
        .envs(&world.env)
        .env("DATABASE_URL", database_url)
        .envs(overrides.iter().copied())
        .output()
        .expect("run approval-bridge doctor");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// The (first) row of `check` in the table: after the result column, the
/// check's name and the two spaces that end its column.
fn row<'a>(table: &'a str, check: &str) -> &'a str {
    table
        .lines()
        .find(|line| {
            line.get(7..)
                .is_some_and(|rest| rest.starts_with(&format!("{check}  ")))
        })
        .unwrap_or_else(|| panic!("no `{check}` row in:\n{table}"))
}

#[tokio::test]
async fn doctor_checks_the_sandbox_world_and_names_a_wrong_phala_key() {
    let world = WorldProcess::start(&[]);
    let database_url = fresh_database().await;
    let migrated = bridge()
        .arg("migrate")
        .env("DATABASE_URL", &database_url)
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{migrated:?}");

    let (code, table, stderr) = doctor(&world, &database_url, &[]);
    assert_eq!(code, 0, "{table}\n{stderr}");
    assert!(table.starts_with("RESULT CHECK"), "{table}");
    assert!(row(&table, "database").starts_with("ok"), "{table}");
    assert!(row(&table, "migrations").contains("all applied"), "{table}");
    assert!(row(&table, "phala").starts_with("ok"), "{table}");
    let chain_id = world.env["APPROVAL_BRIDGE_SAFES"]
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    assert!(
        row(&table, "rpc").contains(&format!("answers for chain {chain_id}")),
        "{table}"
    );
    // The sandbox's Safe: 1.4.1, 2 of 4 owners (one a Safe); its proposer
    // is a delegate of owner 0.
    assert!(
        row(&table, "safe").contains("Safe 1.4.1, 2 of 4 owners"),
        "{table}"
    );
    assert!(row(&table, "safe service").starts_with("ok"), "{table}");
    assert!(
        row(&table, "proposer").contains("is a delegate of owner"),
        "{table}"
    );
    assert!(
        row(&table, "scope").contains("every API token and CI client has a scope"),
        "{table}"
    );
    assert!(
        row(&table, "server secret").contains("set: it keys"),
        "{table}"
    );
    assert!(table.contains("checks passed"), "{table}");
    // No secret reaches the table.
    assert!(
        !table.contains(&world.env["APPROVAL_BRIDGE_PHALA_API_KEY"]),
        "{table}"
    );

    let (code, table, stderr) = doctor(
        &world,
        &database_url,
        &[("APPROVAL_BRIDGE_PHALA_API_KEY", "phak_wrong-key-0000")],
    );
    assert_eq!(code, 1, "{table}\n{stderr}");
    let phala = row(&table, "phala");
    assert!(phala.starts_with("FAIL"), "{table}");
    assert!(
        phala.contains("Phala Cloud refused the API key (HTTP 401)")
            && phala.contains("APPROVAL_BRIDGE_PHALA_API_KEY"),
        "{table}"
    );
    assert!(!phala.contains("phak_wrong-key-0000"), "{table}");

    // A token without a scope may do nothing: doctor says which, and how to fix it.
    let (code, table, _) = doctor(
        &world,
        &database_url,
        &[("APPROVAL_BRIDGE_SCOPES", "ci:ci=*")],
    );
    assert_eq!(code, 1, "{table}");
    let scope = row(&table, "scope");
    assert!(
        scope.starts_with("FAIL") && scope.contains("api:sandbox=*"),
        "{table}"
    );
    // Everything else still passes, and nothing panicked.
    assert!(row(&table, "safe").starts_with("ok"), "{table}");
    assert!(table.contains("1 of "), "{table}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn doctor_fails_on_an_rpc_for_another_chain_and_an_unmigrated_database() {
    let world = WorldProcess::start(&[]);
    let database_url = fresh_database().await;
    let safes = world.env["APPROVAL_BRIDGE_SAFES"].clone();
    let (chain_id, _) = safes.split_once(':').unwrap();
    let rpc = world.env["APPROVAL_BRIDGE_RPC_URLS"]
        .split_once('=')
        .unwrap()
        .1
        .to_owned();
    // The world's RPC, configured for one more chain it does not serve.
    let rpc_urls = format!("{chain_id}={rpc},5={rpc}");
    // Two notification targets: the sandbox's front door answers, nothing
    // listens on port 1.
    let notify_urls = format!(
        "up={}/hook,down=http://127.0.0.1:1/hook-secret-path",
        world.env["APPROVAL_BRIDGE_SANDBOX_URL"].trim_end_matches('/')
    );
    let (code, table, stderr) = doctor(
        &world,
        &database_url,
        &[
            ("APPROVAL_BRIDGE_RPC_URLS", &rpc_urls),
            ("APPROVAL_BRIDGE_NOTIFY_URLS", &notify_urls),
            ("APPROVAL_BRIDGE_NOTIFY_SECRET", "a-long-notify-secret"),
        ],
    );
    assert_eq!(code, 1, "{table}\n{stderr}");
    assert!(row(&table, "migrations").starts_with("FAIL"), "{table}");
    let wrong = table
        .lines()
        .find(|l| l.contains("rpc") && l.contains("chain 5 "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(wrong.starts_with("FAIL"), "{table}");
    assert!(
        wrong.contains(&format!(
            "the RPC configured for chain 5 answers for chain {chain_id}"
        )),
        "{table}"
    );
    let target = |name: &str| {
        table
            .lines()
            .find(|l| l.contains("notification target") && l.contains(&format!(" {name} ")))
            .unwrap_or_else(|| panic!("no notification target `{name}` in:\n{table}"))
    };
    assert!(target("up").starts_with("ok"), "{table}");
    assert!(target("down").starts_with("FAIL"), "{table}");
    assert!(!table.contains("hook-secret-path"), "{table}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
