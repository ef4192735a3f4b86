//! `--help` as a newcomer reads it: every command (and subcommand) ends with examples,
//! every positional argument says what it is, defaults are shown, and `mount --help`
//! says that it stays in the foreground, how to unmount, and where --daemon logs.

mod common;
use common::*;

/// The subcommands a `--help` lists under "Commands:".
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// The section `title` of a help text: its lines up to the next blank line.
fn section<'a>(help: &'a str, title: &str) -> Vec<&'a str> {
    help.lines().skip_while(|l| !l.starts_with(title)).skip(1).take_while(|l| !l.trim().is_empty()).collect()
}

/// Positional arguments without a description: an "Arguments:" line that holds only the
/// name, with no indented description on the line after it.
fn undescribed_positionals(help: &str) -> Vec<String> {
    let lines = section(help, "Arguments:");
    let mut missing = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let indent = l.len() - t.len();
        if !(t.starts_with('<') || t.starts_with('[')) || indent > 2 {
            continue; // a description line of the argument above
        }
        let name_end = t.find(char::is_whitespace).unwrap_or(t.len());
        let same_line = !t[name_end..].trim().is_empty();
        let next_line = lines.get(i + 1).is_some_and(|n| {
            let nt = n.trim_start();
            n.len() - nt.len() > 2 && !nt.is_empty()
        });
        if !same_line && !next_line {
            missing.push(t.to_string());
        }
    }
    missing
}

#[test]
fn every_command_has_examples_and_described_positionals() {
    let repo = Repo::new();
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut seen = 0;
    let mut problems = Vec::new();
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let help = repo.ok(&args);
        seen += 1;
        let name = if path.is_empty() { "keepfs".to_string() } else { path.join(" ") };
        let examples = section(&help, "Examples:");
        let runnable =
            examples.iter().filter(|l| l.trim_start().starts_with("keepfs ") || l.contains(" keepfs ")).count();
        if runnable < 2 {
            problems.push(format!("{name}: no Examples: section with two or more keepfs command lines"));
        }
        for p in undescribed_positionals(&help) {
            problems.push(format!("{name}: positional {p} has no description"));
        }
        for sub in subcommands(&help) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
    }
    assert!(seen > 40, "walked only {seen} commands");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn defaults_and_the_mounts_foreground_are_spelled_out() {
    let repo = Repo::new();
    let backup = repo.ok(&["backup", "--help"]);
    let hints_check = backup.lines().skip_while(|l| !l.contains("--hints-check")).take(4).collect::<Vec<_>>().join(" ");
    assert!(hints_check.contains("[default: 1]"), "{hints_check}");
    let scrub = repo.ok(&["scrub", "--help"]);
    assert!(scrub.contains("[default: 100]"), "{scrub}");

    let mount = repo.ok(&["mount", "--help"]);
    assert!(mount.contains("foreground"), "{mount}");
    assert!(mount.contains("fusermount3 -u"), "{mount}");
    let daemon =
        mount.lines().skip_while(|l| !l.trim_start().starts_with("--daemon")).take(4).collect::<Vec<_>>().join(" ");
    assert!(daemon.contains("mount.log"), "{daemon}");
    let short = repo.ok(&["mount", "-h"]);
    assert!(short.contains("foreground") && short.contains("fusermount3 -u"), "{short}");
    // The short help (-h) shows the examples too.
    assert!(repo.ok(&["restore", "-h"]).contains("keepfs restore --delta-from"));
}
