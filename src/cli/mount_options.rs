//! `keepfs mount DIR -o OPTIONS`: the form mount(8) uses, so that a repository mounts at
//! boot from /etc/fstab. An fstab line of type `fuse.keepfs` makes mount(8) run
//! mount.fuse3, which runs `keepfs SOURCE DIR -o OPTIONS` with the fstab's first field
//! as SOURCE; that field is `mount`. This module owns turning those options into the
//! command line flags of `keepfs mount` (and `--daemon`: mount(8) waits for its helper,
//! which must return once mounted), before clap parses the command line.

use std::sync::OnceLock;

static EFFECTIVE: OnceLock<Vec<String>> = OnceLock::new();

/// Options mount(8) and mount.fuse3 add or pass on that mean nothing to keepfs.
const IGNORED: &[&str] = &[
    "defaults", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto", "user", "nouser", "users",
    "owner", "group", "async", "sync", "atime", "noatime", "relatime", "nofail", "_netdev",
];

/// The command line with `-o OPTIONS` of `keepfs mount` replaced by flags; remembered
/// for [`effective_args`]. Other command lines come back as they are.
pub fn translate(args: Vec<String>) -> Result<Vec<String>, String> {
    let out = rewrite(args)?;
    let _ = EFFECTIVE.set(out.clone());
    Ok(out)
}

/// The command line keepfs runs with (after [`translate`]), program name first.
pub fn effective_args() -> Vec<String> {
    EFFECTIVE.get().cloned().unwrap_or_else(|| std::env::args().collect())
}

fn rewrite(args: Vec<String>) -> Result<Vec<String>, String> {
    let Some(at) = args.iter().skip(1).position(|a| a == "mount").map(|p| p + 1) else {
        return Ok(args);
    };
    // Only a `mount` that is the subcommand: everything before it is an option.
    if args[1..at].iter().any(|a| !a.starts_with('-')) && args[1..at].iter().all(|a| a != "--config") {
        return Ok(args);
    }
    let mut out: Vec<String> = args[..=at].to_vec();
    let mut options = Vec::new();
    let mut rest = args[at + 1..].iter();
    while let Some(a) = rest.next() {
        if a == "-o" {
            let v = rest.next().ok_or("-o needs mount options (ro,allow_other,config=FILE,...)")?;
            options.push(v.clone());
        } else if let Some(v) = a.strip_prefix("-o").filter(|v| !v.is_empty()) {
            options.push(v.to_string());
        } else {
            out.push(a.clone());
        }
    }
    if options.is_empty() {
        return Ok(args);
    }
    let mut daemon = true;
    for o in options.iter().flat_map(|s| s.split(',')).filter(|o| !o.is_empty()) {
        let (k, v) = match o.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (o, None),
        };
        let flag = |name: &str| -> Result<Vec<String>, String> {
            let v = v.filter(|v| !v.is_empty()).ok_or(format!("mount option {k} needs a value ({k}=...)"))?;
            Ok(vec![name.to_string(), v.to_string()])
        };
        let add: Vec<String> = match k {
            "ro" => vec!["--read-only".into()],
            "allow_other" => vec!["--allow-other".into()],
            "page_cache" => vec!["--page-cache".into()],
            "discard_writes" => vec!["--discard-writes".into()],
            "foreground" => {
                daemon = false;
                vec![]
            }
            "uid" => flag("--uid")?,
            "gid" => flag("--gid")?,
            "mode" => flag("--mode")?,
            "threads" => flag("--threads")?,
            "metrics" => flag("--metrics")?,
            "config" => flag("--config")?,
            _ if IGNORED.contains(&k) || k.starts_with("x-") || k == "comment" => vec![],
            _ => {
                return Err(format!(
                    "mount option '{o}' is not one keepfs knows (ro, allow_other, uid=, gid=, mode=, config=, metrics=, threads=, page_cache, discard_writes, foreground)"
                ));
            }
        };
        out.extend(add);
    }
    if daemon {
        out.push("--daemon".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::rewrite;

    fn v(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn fstab_options_become_flags() {
        // What mount.fuse3 runs for `mount /mnt/keep fuse.keepfs ro,config=/etc/k.toml,nofail 0 0`.
        assert_eq!(
            rewrite(v(
                "keepfs mount /mnt/keep -o rw,ro,config=/etc/k.toml,allow_other,uid=64055,x-systemd.automount,dev,suid"
            ))
            .unwrap(),
            v("keepfs mount /mnt/keep --read-only --config /etc/k.toml --allow-other --uid 64055 --daemon")
        );
        assert_eq!(rewrite(v("keepfs mount /m -oforeground")).unwrap(), v("keepfs mount /m"));
        assert_eq!(rewrite(v("keepfs mount /m --read-only")).unwrap(), v("keepfs mount /m --read-only"));
        assert_eq!(rewrite(v("keepfs backup mount x")).unwrap(), v("keepfs backup mount x"));
        assert!(rewrite(v("keepfs mount /m -o bogus")).unwrap_err().contains("'bogus'"));
        assert!(rewrite(v("keepfs mount /m -o uid=")).unwrap_err().contains("uid=..."));
    }
}
