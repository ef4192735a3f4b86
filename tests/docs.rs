//! The shell commands the guides show are the ones that work: each guide's ```sh blocks
//! run, in order, as one `bash -euo pipefail` script in a temporary directory, with a
//! temporary KEEPFS_HOME and this build's `keepfs` first on PATH. A block that fails
//! fails the test, naming the guide and printing the script's output. (```text blocks
//! are shown, not run: install commands and fstab lines, tested elsewhere.)

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The ```sh blocks of a markdown file, in order.
fn sh_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_start() == "```sh" => current = Some(String::new()),
            Some(b) if line.trim_start() == "```" => {
                blocks.push(std::mem::take(b));
                current = None;
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None => {}
        }
    }
    assert!(current.is_none(), "an unclosed ```sh block");
    blocks
}

fn run_guide(name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let blocks = sh_blocks(&text);
    assert!(!blocks.is_empty(), "{name} has no ```sh block");
    let dir = tempfile::tempdir().unwrap();
    let mut script = String::new();
    for (i, b) in blocks.iter().enumerate() {
        script.push_str(&format!("echo '--- {name} block {}'\n{b}", i + 1));
    }
    let bin = Path::new(KEEPFS).parent().unwrap();
    let path_var = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut c = Command::new("bash");
    c.args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", path_var)
        .env("KEEPFS_HOME", dir.path().join("keepfs-home"))
        .env_remove("KEEPFS_CONFIG")
        .env_remove("KEEPFS_KEY_FILE")
        .env_remove("KEEPFS_PASSPHRASE");
    let out = output_within(c, Duration::from_secs(300), name);
    // A mount a failed guide left behind must not outlive the test.
    if common::mount::is_mounted(&dir.path().join("mnt")) {
        let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(dir.path().join("mnt")).status();
    }
    assert!(
        out.status.success(),
        "docs/{name}: a block failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn getting_started_runs() {
    run_guide("getting-started.md");
}

#[test]
fn disaster_recovery_runs() {
    run_guide("disaster-recovery.md");
}

#[test]
fn encryption_runs() {
    run_guide("encryption.md");
}

#[test]
fn performance_runs() {
    run_guide("performance.md");
}

#[test]
fn blocks_are_found() {
    let md = "a\n```sh\necho 1\n```\n```text\nno\n```\n  ```sh\necho 2\necho 3\n  ```\n";
    assert_eq!(sh_blocks(md), ["echo 1\n", "echo 2\necho 3\n"]);
}
