//! The `approval-bridge` binary as a test runs it.

use std::process::Command;

pub fn bridge() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_approval-bridge"));
    // Start from a clean slate: the developer's environment must not leak in.
    for (key, _) in std::env::vars() {
        if key.starts_with("APPROVAL_BRIDGE_") || key == "DATABASE_URL" {
            command.env_remove(key);
        }
    }
    command
}

pub fn one_line_error(output: std::process::Output) -> String {
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    stderr.trim_end().to_owned()
}
