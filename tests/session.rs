//! The write-session service in-process, the way every face uses it: writers that close
//! (and commit) while other threads list, rename, stat and open overlays of the same
//! versions, many rounds, under a deadline; then every committed version restores to
//! exactly what its writer wrote. No lock order can deadlock it: each lock is a leaf.

mod common;
use common::*;
use keepfs::Repository;
use keepfs::backup::BackupOptions;
use keepfs::config::Config;
use keepfs::progress::Silent;
use keepfs::restore::RestoreOptions;
use keepfs::session::{COW_LABEL, SessionOptions, SessionService};
use keepfs::source::Url;
use keepfs_face::Sessions;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

const BS: u32 = 64 * 1024;

fn sha(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(b))
}

#[test]
fn writers_commit_while_others_list_rename_stat_and_open_overlays() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::embedded(dir.path().join("home"));
    config.block_size = BS;
    let repo = Arc::new(Repository::open(config).unwrap());
    let img = dir.path().join("base");
    let base_bytes = random_bytes(1, 16 * BS as usize);
    std::fs::write(&img, &base_bytes).unwrap();
    let base = repo.backup(&Url::File(img), &BackupOptions { name: "base".into(), ..Default::default() }, &Silent);
    let base = base.unwrap().uid.to_string();
    let svc = Arc::new(SessionService::new(repo.clone(), SessionOptions::default()));

    let rounds = 12u64;
    let (tx, rx) = mpsc::channel();
    let (s, b) = (svc.clone(), base.clone());
    let work = std::thread::spawn(move || {
        let mut written = Vec::new();
        for r in 0..rounds {
            let done = Arc::new(AtomicBool::new(false));
            let tmp = format!("tmp{r}");
            let fh = s.create_incoming(&tmp, true, 1000).unwrap();
            s.release(fh).unwrap(); // created, never written: stays for rename to move
            let data = random_bytes(100 + r, 5 * BS as usize + 77);
            written.push((format!("w{r}"), sha(&data)));
            let mut threads = Vec::new();
            {
                let (s, done, data) = (s.clone(), done.clone(), data.clone());
                threads.push(std::thread::spawn(move || {
                    let fh = s.create_incoming(&format!("w{r}"), true, 1).unwrap();
                    for (i, chunk) in data.chunks(50_000).enumerate() {
                        s.write(fh, i as u64 * 50_000, chunk).unwrap();
                    }
                    s.flush(fh, 1).unwrap(); // commits
                    s.release(fh).unwrap();
                    done.store(true, Ordering::SeqCst);
                }));
            }
            {
                let (s, b, done) = (s.clone(), b.clone(), done.clone());
                threads.push(std::thread::spawn(move || {
                    // A new opener each round: the same one within seconds would continue
                    // (and replace) its previous overlay's version.
                    let me = 2000 + r as u32;
                    let o = s.open_version(&b, true, me).unwrap();
                    s.write(o.fh, BS as u64 * 3, &random_bytes(200 + r, BS as usize)).unwrap();
                    s.flush(o.fh, me).unwrap();
                    s.release(o.fh).unwrap();
                    while !done.load(Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                }));
            }
            for k in 0..3u32 {
                let (s, b, done, tmp) = (s.clone(), b.clone(), done.clone(), tmp.clone());
                threads.push(std::thread::spawn(move || {
                    let moved = format!("{tmp}-moved");
                    while !done.load(Ordering::SeqCst) {
                        match k {
                            0 => {
                                for n in s.incoming_names() {
                                    let _ = s.incoming_size(&n);
                                }
                            }
                            1 => {
                                if s.rename_incoming(&tmp, &moved).is_ok() {
                                    s.rename_incoming(&moved, &tmp).unwrap();
                                }
                            }
                            _ => {
                                let _ = s.overlay_size(&b);
                                let _ = s.versions().unwrap();
                                let o = s.open_version(&b, false, 10 + k).unwrap();
                                let mut buf = vec![0u8; 4096];
                                s.read(o.fh, BS as u64 * 3, &mut buf).unwrap();
                                s.release(o.fh).unwrap();
                            }
                        }
                    }
                }));
            }
            for t in threads {
                t.join().unwrap();
            }
            s.remove_incoming(&tmp).unwrap();
        }
        let _ = tx.send(written);
    });
    let written = rx.recv_timeout(Duration::from_secs(300)).expect("the session service wedged (no result in 300 s)");
    work.join().unwrap();
    svc.shutdown();
    assert!(svc.incoming_names().is_empty(), "no draft is left behind");

    let versions = repo.list(None).unwrap();
    for (name, want) in &written {
        let v: Vec<_> = versions.iter().filter(|v| &v.name == name).collect();
        assert_eq!(v.len(), 1, "{name}");
        let out = dir.path().join(format!("{name}.out"));
        repo.restore(v[0].uid, &Url::File(out.clone()), &RestoreOptions::default(), &Silent).unwrap();
        assert_eq!(&sha(&std::fs::read(&out).unwrap()), want, "{name}");
    }
    let cows = versions.iter().filter(|v| v.labels.get(COW_LABEL) == Some(&base)).count();
    assert_eq!(cows as u64, rounds, "one copy-on-write version per round");
    assert!(versions.iter().all(|v| !v.name.starts_with("tmp")), "unwritten backups are no versions");
    let out = dir.path().join("base.out");
    let base_uid = keepfs::version::VersionUid::parse(&base).unwrap();
    repo.restore(base_uid, &Url::File(out.clone()), &RestoreOptions::default(), &Silent).unwrap();
    assert_eq!(std::fs::read(out).unwrap(), base_bytes, "the original never changes");
}
