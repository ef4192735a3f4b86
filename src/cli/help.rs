//! The examples that end each command's `--help` (part of the binary): two or three
//! command lines an operator can copy, per command, kept here in one table so that the
//! command definitions in args.rs stay readable. A command whose definition sets its own
//! `after_help` keeps it. tests/help.rs checks that every command has examples.

/// (command path, examples), the path as typed after `keepfs`.
const EXAMPLES: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "keepfs backup /dev/vg0/vm1-snap vm1",
            "keepfs ls 'name == \"vm1\"'",
            "keepfs restore V0000000001 /tmp/vm1.img",
        ],
    ),
    (
        "backup",
        &[
            "keepfs backup disk.img vm1",
            "keepfs backup -s nightly -l env=prod --expire 2027-01-31 /dev/vg0/db-snap db",
            "keepfs backup --hints changes.json --base V0000000001 /dev/vg0/db-snap db",
        ],
    ),
    (
        "restore",
        &[
            "keepfs restore V0000000002 /tmp/db.img",
            "keepfs restore --force --sparse V0000000002 /dev/vg0/db-restore",
            "keepfs restore --delta-from V0000000001 V0000000002 /srv/standby/db.img",
        ],
    ),
    (
        "ls",
        &["keepfs ls", "keepfs ls 'name == \"db\" and labels[\"env\"] == \"prod\"' --format json", "keepfs ls -m -s"],
    ),
    ("label", &["keepfs label V0000000001 env=prod", "keepfs label V0000000001 checked env-"]),
    ("scrub", &["keepfs scrub V0000000001", "keepfs scrub -p 10 V0000000001"]),
    ("deep-scrub", &["keepfs deep-scrub V0000000001", "keepfs deep-scrub -s /dev/vg0/db-snap V0000000001"]),
    ("batch-scrub", &["keepfs batch-scrub", "keepfs batch-scrub -p 5 'name == \"db\"'"]),
    ("batch-deep-scrub", &["keepfs batch-deep-scrub", "keepfs batch-deep-scrub -p 10 'name == \"db\"'"]),
    (
        "enforce",
        &["keepfs enforce latest3,days30,months12 --dry-run", "keepfs enforce latest7,weeks4 'name == \"db\"'"],
    ),
    ("due", &["keepfs due", "keepfs due db -s daily,weekly --format json"]),
    ("sla", &["keepfs sla", "keepfs sla db -s daily --format json"]),
    ("init", &["keepfs init", "KEEPFS_KEY_FILE=/etc/keepfs/key keepfs init --encrypt -S offsite"]),
    ("storage", &["keepfs storage list", "keepfs storage stats default"]),
    ("storage list", &["keepfs storage list", "keepfs storage list --format json"]),
    ("storage stats", &["keepfs storage stats default", "keepfs storage stats offsite --format json"]),
    ("key", &["keepfs key new /etc/keepfs/key", "keepfs key list -S offsite"]),
    ("key new", &["keepfs key new /etc/keepfs/key", "keepfs key new ./offsite.key"]),
    ("key list", &["keepfs key list", "keepfs key list -S offsite --format json"]),
    (
        "key rotate",
        &[
            "keepfs key rotate --new-key-file /etc/keepfs/key-2027",
            "KEEPFS_NEW_PASSPHRASE=... keepfs key rotate -S offsite",
        ],
    ),
    ("key rekey", &["keepfs key rekey", "keepfs key rekey -S offsite"]),
    ("key remove", &["keepfs key remove 0123456789abcdef", "keepfs key remove -S offsite 0123456789abcdef"]),
    ("metadata", &["keepfs metadata export V0000000001 v1.json", "keepfs metadata import v1.json"]),
    (
        "metadata export",
        &["keepfs metadata export V0000000001 v1.json", "keepfs metadata export V0000000001 V0000000002 -"],
    ),
    (
        "metadata import",
        &[
            "keepfs metadata import v1.json",
            "ssh old-host keepfs metadata export V0000000001 - | keepfs metadata import -",
        ],
    ),
    ("metadata backup", &["keepfs metadata backup", "keepfs metadata backup 'name == \"db\"'"]),
    (
        "metadata restore",
        &["keepfs metadata restore V0000000001", "keepfs metadata restore --force V0000000001 V0000000002"],
    ),
    ("database", &["keepfs database rebuild", "keepfs database rebuild --replace-damaged"]),
    ("database rebuild", &["keepfs database rebuild", "keepfs database rebuild --replace-damaged"]),
    ("config", &["keepfs config check", "keepfs --config /etc/keepfs/keepfs.toml config check"]),
    ("expire", &["keepfs expire V0000000001 2027-01-31", "keepfs expire V0000000001 ''"]),
    ("rm", &["keepfs rm --dry-run V0000000001 V0000000002", "keepfs rm V0000000001 && keepfs cleanup"]),
    ("protect", &["keepfs protect V0000000001", "keepfs protect V0000000001 V0000000002"]),
    ("unprotect", &["keepfs unprotect V0000000001", "keepfs unprotect V0000000001 && keepfs rm V0000000001"]),
    (
        "mount",
        &[
            "keepfs mount /mnt/keepfs        (stops with: fusermount3 -u /mnt/keepfs)",
            "keepfs mount --daemon --read-only /mnt/keepfs",
            "keepfs mount --allow-other --uid 64055 --gid 64055 --mode 0640 /mnt/keepfs",
        ],
    ),
    (
        "completion",
        &["keepfs completion bash > /etc/bash_completion.d/keepfs", "keepfs completion zsh > ~/.zfunc/_keepfs"],
    ),
    ("man", &["keepfs man /usr/local/share/man/man1 && man keepfs-backup", "keepfs man ./man"]),
    (
        "nbd",
        &[
            "keepfs nbd --read-only",
            "keepfs nbd --socket /run/keepfs.sock   (then: nbdinfo 'nbd+unix:///vm1@latest?socket=/run/keepfs.sock')",
        ],
    ),
    ("cleanup", &["keepfs cleanup --dry-run", "keepfs cleanup -S offsite"]),
    ("bench", &["keepfs bench", "keepfs bench --format json", "keepfs bench -S offsite --size 256M"]),
];

/// The examples of the command at `path` ("" for keepfs itself, "key list").
pub fn examples(path: &str) -> Option<&'static [&'static str]> {
    EXAMPLES.iter().find(|(p, _)| *p == path).map(|(_, e)| *e)
}

/// Gives every command in the tree an `Examples:` section from the table, unless it has
/// an after_help of its own.
pub fn with_examples(cmd: clap::Command) -> clap::Command {
    fn walk(mut cmd: clap::Command, path: String) -> clap::Command {
        if cmd.get_after_help().is_none()
            && let Some(ex) = examples(&path)
        {
            let lines: Vec<String> = ex.iter().map(|e| format!("  {e}")).collect();
            cmd = cmd.after_help(format!("Examples:\n{}", lines.join("\n")));
        }
        let names: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
        for name in names {
            let sub_path = if path.is_empty() { name.clone() } else { format!("{path} {name}") };
            cmd = cmd.mut_subcommand(&name, |s| walk(s, sub_path));
        }
        cmd
    }
    walk(cmd, String::new())
}
