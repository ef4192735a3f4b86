//! The write-session service in-process, the way every face uses it: writers that close
//! (and commit) while other threads list, rename, stat and open overlays of the same
//! versions, many rounds, under a deadline; then every committed version restores to
//! exactly what its writer wrote. No lock order can deadlock it: each lock is a leaf.
//! Each test's repository is on its own PostgreSQL catalog when `KEEPFS_TEST_POSTGRES`
//! is set (`embedded_config` of tests/common).

mod common;
use common::*;
use keepfs::Repository;
use keepfs::backup::BackupOptions;
use keepfs::progress::Silent;
use keepfs::restore::RestoreOptions;
use keepfs::session::{COW_LABEL, SessionOptions, SessionService};
use keepfs::source::Url;
use keepfs::version::Status;
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
    let (mut config, _db) = embedded_config(dir.path().join("home"));
    config.block_size = BS;
    let repo = Arc::new(Repository::open(config).unwrap());
    let img = dir.path().join("base");
    let base_bytes = random_bytes(1, 16 * BS as usize);
    std::fs::write(&img, &base_bytes).unwrap();
    let base = repo.backup(&Url::File(img), &BackupOptions { name: "base".into(), ..Default::default() }, &Silent);
    let base = base.unwrap().uid.to_string();
    let svc = Arc::new(SessionService::new(repo.clone(), SessionOptions::default()).unwrap());

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

/// The repository, its session service, and its test catalog (keep it while they are used).
fn service(dir: &std::path::Path) -> (Arc<Repository>, SessionService, Option<TestDatabase>) {
    let (mut config, db) = embedded_config(dir.join("home"));
    config.block_size = BS;
    let repo = Arc::new(Repository::open(config).unwrap());
    (repo.clone(), SessionService::new(repo, SessionOptions::default()).unwrap(), db)
}

fn write_incoming(s: &SessionService, name: &str, opener: u32, data: &[u8]) -> std::io::Result<()> {
    let fh = s.create_incoming(name, true, opener)?;
    s.write(fh, 0, data)?;
    s.flush(fh, opener)?;
    s.release(fh)
}

fn valid_named(repo: &Repository, name: &str) -> Vec<keepfs::version::Version> {
    repo.list(None).unwrap().into_iter().filter(|v| v.name == name && v.status == Status::Valid).collect()
}

/// A continuation belongs to the tool that committed: another process that writes the
/// same name later makes a backup of its own, and never replaces the first one.
#[test]
fn another_process_never_attaches_to_a_continuation() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, s, _db) = service(dir.path());
    write_incoming(&s, "vm", 1, &random_bytes(1, 100_000)).unwrap();
    assert!(s.incoming_exists("vm", Some(1)), "the committer looks again: a continuation");
    assert!(!s.incoming_exists("vm", Some(2)), "to anyone else the name is free");
    assert_eq!(s.open_incoming("vm", true, 2).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    write_incoming(&s, "vm", 2, &random_bytes(2, 100_000)).unwrap();
    assert_eq!(valid_named(&repo, "vm").len(), 2, "two backups; the first was not replaced");
}

/// A version a continuation replaces is kept while someone reads it.
#[test]
fn a_replaced_version_that_is_being_read_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, s, _db) = service(dir.path());
    let first = random_bytes(3, 100_000);
    write_incoming(&s, "vm", 1, &first).unwrap();
    let v1 = valid_named(&repo, "vm")[0].uid.to_string();
    let reader = s.open_version(&v1, false, 50).unwrap();
    // The committer reopens and writes again: a continuation that replaces v1.
    let fh = s.open_incoming("vm", true, 1).unwrap();
    s.write(fh, 0, &random_bytes(4, 1000)).unwrap();
    s.flush(fh, 1).unwrap();
    s.release(fh).unwrap();
    let mut buf = vec![0u8; 1000];
    s.read(reader.fh, 50_000, &mut buf).unwrap();
    assert_eq!(&buf[..], &first[50_000..51_000], "the reader still reads v1");
    assert_eq!(valid_named(&repo, "vm").len(), 2, "v1 is kept while it is read");
    s.release(reader.fh).unwrap();
}

/// A size past what a version may hold is EFBIG, not an abort of the whole process.
#[test]
fn an_impossible_size_is_efbig() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, s, _db) = service(dir.path());
    let fh = s.create_incoming("big", true, 1).unwrap();
    assert_eq!(s.resize_incoming("big", 1 << 60).unwrap_err().raw_os_error(), Some(libc::EFBIG));
    assert_eq!(s.write(fh, u64::MAX - 10, b"0123456789ab").unwrap_err().raw_os_error(), Some(libc::EFBIG));
    // Refused sizes changed nothing: the file takes ordinary writes and becomes a version.
    s.write(fh, 0, &random_bytes(5, 5000)).unwrap();
    s.flush(fh, 1).unwrap();
    s.release(fh).unwrap();
    let v = valid_named(&repo, "big");
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].size, 5000);
}

/// Two writers of one overlay that close at the same moment: one of them is the last,
/// and the overlay becomes a version every time.
#[test]
fn simultaneous_last_closes_still_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, s, _db) = service(dir.path());
    let base = write_base(&repo, dir.path());
    let s = Arc::new(s);
    let rounds = 40u32;
    for r in 0..rounds {
        let (a, b) = (10_000 + 2 * r, 10_001 + 2 * r);
        let fa = s.open_version(&base, true, a).unwrap().fh;
        let fb = s.open_version(&base, true, b).unwrap().fh;
        s.write(fa, 0, &[r as u8; 4096]).unwrap();
        s.write(fb, 8192, &[r as u8; 4096]).unwrap();
        let gate = Arc::new(std::sync::Barrier::new(2));
        let t: Vec<_> = [fa, fb]
            .into_iter()
            .map(|fh| {
                let (s, gate) = (s.clone(), gate.clone());
                std::thread::spawn(move || {
                    gate.wait();
                    s.release(fh).unwrap();
                })
            })
            .collect();
        for t in t {
            t.join().unwrap();
        }
    }
    let cows = repo.list(None).unwrap().into_iter().filter(|v| v.labels.get(COW_LABEL) == Some(&base)).count();
    assert_eq!(cows as u32, rounds, "every round's overlay became a version");
    assert!(s.overlay_size(&base).is_none(), "no overlay is left behind");
}

fn write_base(repo: &Repository, dir: &std::path::Path) -> String {
    let img = dir.join("base.img");
    std::fs::write(&img, random_bytes(9, 4 * BS as usize)).unwrap();
    let opts = BackupOptions { name: "base".into(), ..Default::default() };
    repo.backup(&Url::File(img), &opts, &Silent).unwrap().uid.to_string()
}
