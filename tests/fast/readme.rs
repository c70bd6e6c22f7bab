//! README's configuration table documents every setting `serve` reads.

#[test]
fn every_setting_of_serve_is_in_the_readme_table() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_approval-bridge"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let variables: Vec<&str> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split([']', '=']).next())
        .collect();
    assert!(variables.len() > 20, "{help}");
    for variable in variables {
        assert!(
            readme.contains(&format!("| `{variable}` |")),
            "{variable} is missing from README's configuration table"
        );
    }
}
