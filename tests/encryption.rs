//! Encrypted repositories, as a user runs them: a key file or passphrase, `init
//! --encrypt`, backups and restores, what the storage operator sees, tampering, a wrong
//! or missing key, rotation, rekey and removal of the old key.

mod common;
use common::*;
use std::fs;
use std::path::PathBuf;

const BS: usize = 64 * 1024;

/// A repository whose commands all get the key from `KEEPFS_KEY_FILE`.
struct Enc {
    repo: Repo,
    key: PathBuf,
}

impl Enc {
    fn new() -> Enc {
        let repo = Repo::new();
        let key = repo.path("master.key");
        let r = repo.run(&["key", "new", key.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let e = Enc { repo, key };
        let r = e.run(&["init", "--encrypt"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.stderr.contains("is encrypted with key"), "{}", r.stderr);
        e
    }
    fn run_with(&self, env: &[(&str, &str)], args: &[&str]) -> Run {
        self.repo.run_env(args, env)
    }
    fn run(&self, args: &[&str]) -> Run {
        self.run_with(&[("KEEPFS_KEY_FILE", self.key.to_str().unwrap())], args)
    }
    fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, 0, "keepfs {args:?}: {}", r.stderr);
        r.stdout
    }
    fn backup(&self, image: &str, name: &str) -> String {
        self.ok(&["backup", &self.repo.url(image), name, "-b", "64k"]).trim().to_string()
    }
    fn restore_sha(&self, uid: &str) -> String {
        let out = self.repo.path("restored");
        let _ = fs::remove_file(&out);
        self.ok(&["restore", uid, &self.repo.url("restored")]);
        sha256_file(&out)
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Recomputes an object's payload and header CRCs, as a deliberate attacker would: only
/// the cryptographic checks are left to catch the change.
fn fix_crcs(obj: &mut [u8]) {
    let env_len = u16::from_le_bytes([obj[14], obj[15]]) as usize;
    let header_len = 72 + env_len;
    let pcrc = crc32fast::hash(&obj[header_len..]);
    obj[32..36].copy_from_slice(&pcrc.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&obj[0..36]);
    h.update(&obj[40..header_len]);
    let hcrc = h.finalize();
    obj[36..40].copy_from_slice(&hcrc.to_le_bytes());
}

#[test]
fn an_encrypted_repository_round_trips_and_shows_the_storage_nothing() {
    let e = Enc::new();
    let repo = &e.repo;
    let img = mixed_image(81, 20, BS, 333);
    fs::write(repo.path("a"), &img).unwrap();
    let v1 = e.backup("a", "secret-name");
    assert_eq!(e.restore_sha(&v1), sha256_file(&repo.path("a")));
    // Deduplication works under keyed ids.
    let v2 = e.backup("a", "secret-name");
    assert_eq!(repo.version(&v2)["stats"]["bytes_written"], 0);

    // The storage holds no plaintext: no block's bytes, no name, no plain content address.
    let blocks = files_under(&repo.storage().join("blocks"));
    assert!(!blocks.is_empty());
    let compressible = &img[BS..2 * BS]; // block 1 of mixed_image is one repeated letter
    let random = &img[3 * BS..4 * BS];
    for f in &blocks {
        let bytes = fs::read(f).unwrap();
        assert_eq!(u16::from_le_bytes([bytes[12], bytes[13]]) & 2, 2, "{} is not sealed", f.display());
        assert!(!contains(&bytes, &random[..64]) && !contains(&bytes, &compressible[..64]));
    }
    assert!(!repo.object_file(random).exists(), "object names are not the SHA-256 of the plaintext");
    let vobj = fs::read(repo.storage().join("versions").join(&v1)).unwrap();
    assert!(!contains(&vobj, b"secret-name"));
    let ring = fs::read_to_string(repo.storage().join("keyring")).unwrap();
    assert!(ring.contains("keepfs-keyring") && !ring.contains(fs::read_to_string(&e.key).unwrap().trim()));

    let list: serde_json::Value = serde_json::from_str(&e.ok(&["key", "list", "--format", "json"])).unwrap();
    let kid = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(list[0]["current"], true);
    assert_eq!(list[0]["objects"].as_u64().unwrap(), blocks.len() as u64);

    // Light and deep scrub pass; the database can be rebuilt from the sealed objects.
    e.ok(&["scrub", &v1]);
    e.ok(&["deep-scrub", &v1]);
    repo.lose_catalog();
    e.ok(&["database", "rebuild"]);
    assert_eq!(e.restore_sha(&v2), sha256_file(&repo.path("a")));

    // No key, a wrong key, a wrong passphrase: one-line errors naming the key needed.
    let id = String::from_utf8(fs::read(&e.key).unwrap()).unwrap();
    assert_eq!(id.trim().len(), 64);
    // After the rebuild the keys of objects are not known until a rekey records them.
    assert!(e.run(&["key", "list"]).stderr.contains("have no key recorded"));
    assert!(
        e.run(&["key", "rekey"])
            .stderr
            .contains(&format!("rewrapped 0 object(s); {} had the current key already", blocks.len() + 2))
    );
    let list: serde_json::Value = serde_json::from_str(&e.ok(&["key", "list", "--format", "json"])).unwrap();
    assert_eq!(list[0]["objects"].as_u64().unwrap(), blocks.len() as u64);
    let other = repo.path("other.key");
    e.ok(&["key", "new", other.to_str().unwrap()]);
    let out = repo.url("x");
    for (env, needle) in [
        (
            vec![],
            format!(
                "is encrypted and no key was given: set KEEPFS_KEY_FILE or KEEPFS_PASSPHRASE, or key_file / passphrase_file in the configuration (it needs key {kid})"
            ),
        ),
        (vec![("KEEPFS_KEY_FILE", other.to_str().unwrap())], format!("does not open its keyring; it needs key {kid}")),
        (vec![("KEEPFS_PASSPHRASE", "guess")], format!("the passphrase does not open its keyring; it needs key {kid}")),
    ] {
        let r = e.run_with(&env, &["restore", &v1, &out]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.error_line().contains(&needle), "{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    }
    assert!(!repo.path("x").exists());
    // Listing needs no key, and neither does removing: a retention job can run without it.
    assert_eq!(e.run_with(&[], &["ls"]).code, 0);
    fs::write(repo.path("c"), random_bytes(82, 3 * BS)).unwrap();
    let v3 = e.backup("c", "secret-name");
    let before = repo.block_objects();
    for args in [vec!["rm", "--force", &v3], vec!["cleanup"]] {
        let r = e.run_with(&[], &args);
        assert_eq!(r.code, 0, "{args:?} without a key: {}", r.stderr);
    }
    assert_eq!(repo.block_objects(), before - 3, "v3's own blocks are gone");
    assert!(!repo.storage().join("versions").join(&v3).exists());
    assert_eq!(e.restore_sha(&v2), sha256_file(&repo.path("a")));
    e.ok(&["deep-scrub", &v2]);
    // Initialising twice, or a storage that has data, is refused.
    let r = e.run(&["init", "--encrypt"]);
    assert_eq!(r.code, 4);
    assert!(r.error_line().contains("is encrypted already"), "{}", r.stderr);
}

/// `keepfs init --encrypt` while first backups run, which opened the storage before it
/// had a keyring (stopped there by the test): init goes through, and each of them stops
/// with one line and stores nothing, neither a block of an image nor the version object
/// of an image with no block to store (a drill saw such backups exit 0 with plaintext
/// that no restore could read: "object is not encrypted but its storage is"). With the
/// key, the next backup restores byte-identical.
#[test]
fn backups_that_opened_the_storage_before_init_encrypt_store_nothing_in_plaintext() {
    let repo = Repo::new();
    let key = repo.path("master.key");
    repo.ok(&["key", "new", key.to_str().unwrap()]);
    fs::write(repo.path("a"), random_bytes(77, 5 * BS + 9)).unwrap();
    let knob = "KEEPFS_TEST_STOP_BEFORE_VERSION_ROW";
    let blocks = Stoppable::start(&repo, &["backup", &repo.url("a"), "blocks", "-b", "64k"], knob);
    let sparse = Stoppable::start(&repo, &["backup", "null://4M", "sparse", "-b", "64k"], knob);
    let e = Enc { repo, key };
    let r = e.run(&["init", "--encrypt"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for stopped in [blocks, sparse] {
        let out = stopped.go_on();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("was made encrypted") && stderr.contains("unencrypted"), "{stderr}");
    }
    let repo = &e.repo;
    assert_eq!(count_files(&repo.storage().join("blocks")), 0, "no plaintext block");
    assert_eq!(count_files(&repo.storage().join("versions")), 0, "no plaintext version object");
    let v = e.backup("a", "vm");
    assert_eq!(e.restore_sha(&v), sha256_file(&repo.path("a")));
    e.ok(&["deep-scrub", &v]);
}

/// `init --encrypt` killed after marking the storage and before writing its keyring,
/// while a backup that had opened the storage before stopped at the mark (leaving an
/// incomplete version and placeholder rows, nothing stored): writers are told the
/// keyring is missing and to run init again, and init run again finishes (a drill found
/// it refused for those rows, with no way out but rm, cleanup and a wait).
#[test]
fn init_encrypt_killed_before_its_keyring_is_finished_by_running_it_again() {
    let repo = Repo::new();
    let key = repo.path("master.key");
    repo.ok(&["key", "new", key.to_str().unwrap()]);
    fs::write(repo.path("a"), random_bytes(78, 4 * BS + 1)).unwrap();
    let early = Stoppable::start(
        &repo,
        &["backup", &repo.url("a"), "early", "-b", "64k"],
        "KEEPFS_TEST_STOP_BEFORE_VERSION_ROW",
    );
    let with_key = [("KEEPFS_KEY_FILE", key.to_str().unwrap())];
    let init = Stoppable::start_with_env(&repo, &["init", "--encrypt"], "KEEPFS_TEST_STOP_BEFORE_KEYRING", &with_key);
    let out = early.go_on();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    drop(init); // killed before its keyring
    assert_eq!(count_files(&repo.storage().join("blocks")), 0);
    let r = repo.run_env(&["backup", &repo.url("a"), "vm", "-b", "64k"], &with_key);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.error_line().contains("keyring object is missing") && r.error_line().contains("run it again"),
        "{}",
        r.stderr
    );
    let e = Enc { repo, key };
    let r = e.run(&["init", "--encrypt"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = e.backup("a", "vm");
    assert_eq!(e.restore_sha(&v), sha256_file(&e.repo.path("a")));
    e.ok(&["deep-scrub", &v]);
}

/// A large version object (the threshold lowered to nothing for the test) is sealed
/// like any other: it checks, rebuilds the catalog, and restores.
#[test]
fn a_large_version_object_is_sealed_too() {
    let e = Enc::new();
    let img = mixed_image(77, 40, BS, 99);
    fs::write(e.repo.path("img"), &img).unwrap();
    let key = e.key.to_str().unwrap().to_string();
    let env = [("KEEPFS_KEY_FILE", key.as_str()), ("KEEPFS_TEST_STREAMED_INDEX", "0")];
    let r = e.run_with(&env, &["backup", &e.repo.url("img"), "vm", "-b", "64k"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let uid = r.stdout.trim().to_string();
    let object = fs::read(e.repo.storage().join("versions").join(&uid)).unwrap();
    let flags = u16::from_le_bytes([object[12], object[13]]);
    assert_eq!(flags, 2, "sealed, not compressed");
    // Checked, and the catalog rebuilt from it, as a stream: opened as it is read, its
    // index kept in a spool file, nothing trusted before the tag authenticates.
    let r = e.run_with(&env, &["deep-scrub", &uid]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    e.repo.lose_catalog();
    let r = e.run_with(&env, &["database", "rebuild"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(e.restore_sha(&uid), sha256_file(&e.repo.path("img")));
    let spool = e.repo.home().join("spool");
    assert_eq!(fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0), 0, "{spool:?}");
    // A ciphertext byte altered (the checksums made right again): damage, to a scrub
    // and to a rebuild, and nothing of it recorded.
    let path = e.repo.storage().join("versions").join(&uid);
    let mut bad = object.clone();
    let n = bad.len();
    bad[n / 2] ^= 0x40;
    fix_crcs(&mut bad);
    fs::write(&path, &bad).unwrap();
    let r = e.run_with(&env, &["deep-scrub", &uid]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("fails authentication (payload)"), "{}", r.stderr);
    e.repo.lose_catalog();
    let r = e.run_with(&env, &["database", "rebuild"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let line = format!("keepfs: damaged: storage 'default' object versions/{uid}: ");
    assert!(r.stderr.contains(&line) && r.stderr.contains("fails authentication (payload)"), "{}", r.stderr);
    assert_eq!(e.ok(&["ls", "--format", "json"]).trim(), "[]");
    assert_eq!(fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0), 0, "{spool:?}");
    // Put back, the next rebuild brings the version back.
    fs::write(&path, &object).unwrap();
    let r = e.run_with(&env, &["database", "rebuild"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(e.restore_sha(&uid), sha256_file(&e.repo.path("img")));
}

#[test]
fn tampering_is_detected_on_restore_and_deep_scrub() {
    let e = Enc::new();
    let repo = &e.repo;
    // Six distinct random blocks, all the same length (their objects can swap bodies).
    let img: Vec<u8> = (0..6u64).flat_map(|i| random_bytes(900 + i, BS)).collect();
    fs::write(repo.path("a"), &img).unwrap();
    let v = e.backup("a", "t");
    let objects = files_under(&repo.storage().join("blocks"));
    assert_eq!(objects.len(), 6);
    let originals: Vec<Vec<u8>> = objects.iter().map(|f| fs::read(f).unwrap()).collect();
    let header_len = 72 + 80;
    let last = originals[0].len() - 1;
    type Tamper = Box<dyn Fn(&mut Vec<u8>, &[u8])>;
    let cases: Vec<(&str, Tamper)> = vec![
        ("a ciphertext byte", Box::new(move |o, _| o[header_len + 100] ^= 0x01)),
        ("a tag byte", Box::new(move |o, _| o[last] ^= 0x80)),
        ("the wrapped data key", Box::new(|o, _| o[72 + 30] ^= 0x01)),
        ("the header's object id", Box::new(|o, _| o[50] ^= 0x01)),
        ("the body of another object", Box::new(move |o, other| o[header_len..].copy_from_slice(&other[header_len..]))),
        (
            "the envelope of another object",
            Box::new(move |o, other| o[72..header_len].copy_from_slice(&other[72..header_len])),
        ),
    ];
    for (what, tamper) in cases {
        let mut bad = originals[2].clone();
        tamper(&mut bad, &originals[3]);
        fix_crcs(&mut bad);
        fs::write(&objects[2], &bad).unwrap();
        let r = e.run(&["deep-scrub", &v]);
        assert_eq!(r.code, 3, "{what}: {}", r.stderr);
        assert!(
            r.stderr.contains("fails authentication") || r.stderr.contains("does not match its id"),
            "{what}: {}",
            r.stderr
        );
        let out = repo.path("o");
        let _ = fs::remove_file(&out);
        let r = e.run(&["restore", &v, &repo.url("o")]);
        assert_eq!(r.code, 3, "{what}: {}", r.stderr);
        assert!(r.stderr.contains("damaged: block"), "{what}: {}", r.stderr);
        // Only the tampered block is lost (written as zeros); the others are intact.
        let got = fs::read(&out).unwrap();
        let lost: Vec<usize> = (0..6).filter(|&i| got[i * BS..(i + 1) * BS] != img[i * BS..(i + 1) * BS]).collect();
        assert_eq!(lost.len(), 1, "{what}");
        assert!(got[lost[0] * BS..(lost[0] + 1) * BS].iter().all(|&b| b == 0), "{what}");
        // Put the object back; a full deep scrub makes the version valid again.
        fs::write(&objects[2], &originals[2]).unwrap();
        e.ok(&["deep-scrub", &v]);
        assert_eq!(repo.version(&v)["status"], "valid", "{what}");
    }
    // A plaintext object planted in an encrypted storage is refused.
    let plain = keepfs::block::encode_object(keepfs::block::ObjectKind::Block, &[0u8; 32], &img[..BS], 0).unwrap();
    fs::write(&objects[2], plain).unwrap();
    let r = e.run(&["deep-scrub", &v]);
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("is not encrypted but its storage is"), "{}", r.stderr);
}

/// A large version object the catalog does not know (another catalog's; large because
/// the threshold is lowered to nothing for the test) is rewrapped through a spool file
/// by `key rekey`, not read whole: its header moves to the new key, its sealed payload
/// stays byte for byte, nothing is left in the spool, and the old key can go.
#[test]
fn a_large_version_object_of_another_catalog_is_rewrapped_through_a_spool_file() {
    let e = Enc::new();
    let repo = &e.repo;
    fs::write(repo.path("a"), mixed_image(85, 12, BS, 0)).unwrap();
    let v1 = e.backup("a", "r");
    let versions = repo.storage().join("versions");
    let foreign = fs::read(versions.join(&v1)).unwrap();
    fs::write(versions.join("V0000000999"), &foreign).unwrap();
    let pass = repo.path("pass");
    fs::write(&pass, "another long passphrase\n").unwrap();
    e.ok(&["key", "rotate", "--new-passphrase-file", pass.to_str().unwrap()]);
    let env = [("KEEPFS_PASSPHRASE", "another long passphrase"), ("KEEPFS_TEST_STREAMED_INDEX", "0")];
    let ok = |args: &[&str]| {
        let r = e.run_with(&env, args);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
        r.stdout
    };
    let keys: serde_json::Value = serde_json::from_str(&ok(&["key", "list", "--format", "json"])).unwrap();
    let (old, new) = (keys[0]["id"].as_str().unwrap().to_string(), keys[1]["id"].as_str().unwrap().to_string());
    assert_eq!(hex::encode(&foreign[72..80]), old);

    ok(&["key", "rekey"]);
    let after = fs::read(versions.join("V0000000999")).unwrap();
    assert_eq!(after.len(), foreign.len());
    assert_eq!(hex::encode(&after[72..80]), new, "the foreign version object is under the new key");
    assert_eq!(after[152..], foreign[152..], "its sealed payload is untouched");
    let spool = repo.home().join("spool");
    assert_eq!(fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0), 0, "{spool:?}");
    ok(&["key", "remove", &old]);
    ok(&["deep-scrub", &v1]);
    let out = repo.path("o");
    ok(&["restore", &v1, &repo.url("o")]);
    assert_eq!(sha256_file(&out), sha256_file(&repo.path("a")));
}

#[test]
fn keys_rotate_rekey_and_the_old_key_goes() {
    let e = Enc::new();
    let repo = &e.repo;
    fs::write(repo.path("a"), mixed_image(83, 12, BS, 0)).unwrap();
    let v1 = e.backup("a", "r");
    let pass = repo.path("pass");
    fs::write(&pass, "a long passphrase\n").unwrap();
    let r = e.run(&["key", "rotate", "--new-passphrase-file", pass.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let pw = [("KEEPFS_PASSPHRASE", "a long passphrase")];
    // The old key is refused now: new objects must get the new key.
    let r = e.run(&["restore", &v1, &repo.url("o")]);
    assert_eq!(r.code, 2);
    assert!(r.error_line().contains("an older key; the keyring was rotated to"), "{}", r.stderr);
    // The new key reads what the old one sealed, and seals what comes next.
    let ok = |args: &[&str]| {
        let r = e.run_with(&pw, args);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
        r.stdout
    };
    ok(&["restore", &v1, &repo.url("o1")]);
    assert_eq!(sha256_file(&repo.path("o1")), sha256_file(&repo.path("a")));
    fs::write(repo.path("b"), mixed_image(84, 12, BS, 0)).unwrap();
    let v2 = ok(&["backup", &repo.url("b"), "r", "-b", "64k"]).trim().to_string();
    let keys: serde_json::Value = serde_json::from_str(&ok(&["key", "list", "--format", "json"])).unwrap();
    let (old, new) = (keys[0]["id"].as_str().unwrap().to_string(), keys[1]["id"].as_str().unwrap().to_string());
    assert_eq!(keys[1]["current"], true);
    assert_eq!(keys[1]["kind"], "passphrase");
    assert!(keys[0]["objects"].as_u64().unwrap() > 0 && keys[1]["objects"].as_u64().unwrap() > 0, "{keys}");

    // The old key cannot go while objects need it; rekey moves them (headers only).
    let r = e.run_with(&pw, &["key", "remove", &old]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("run `keepfs key rekey"), "{}", r.stderr);
    let files = files_under(&repo.storage().join("blocks"));
    let before: Vec<Vec<u8>> = files.iter().map(|f| fs::read(f).unwrap()).collect();
    // A version object the catalog does not know (another catalog's, say) has only its
    // own copy: rekey rewraps it rather than skip it.
    let versions = repo.storage().join("versions");
    let v1_old_key = fs::read(versions.join(&v1)).unwrap();
    fs::write(versions.join("V0000000999"), &v1_old_key).unwrap();
    // A block missing when rekey comes to it is not recorded as moved: the old key
    // stays until a rekey has really moved it.
    let parked = repo.path("parked");
    // A block of v1, under the old key (v2's are under the new one already).
    let away = before.iter().position(|b| hex::encode(&b[72..80]) == old).expect("a block under the old key");
    fs::rename(&files[away], &parked).unwrap();
    let r = e.run_with(&pw, &["key", "rekey"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("1 listed object(s) were gone"), "{}", r.stderr);
    let r = e.run_with(&pw, &["key", "remove", &old]);
    assert_eq!(r.code, 4, "the missing block may still need the old key: {}", r.stderr);
    fs::rename(&parked, &files[away]).unwrap();
    let r = e.run_with(&pw, &["key", "rekey"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("rewrapped 1 object(s)"), "only the block that was away is left: {}", r.stderr);
    // Version objects are written anew from the catalog, or rewrapped, under the new key.
    for f in files_under(&versions) {
        assert_eq!(hex::encode(&fs::read(&f).unwrap()[72..80]), new, "{} is under the new key", f.display());
    }
    fs::remove_file(versions.join("V0000000999")).unwrap();
    // `key remove` reads the version objects' headers too: one under the old key (put
    // there after the rekey) keeps the old key.
    fs::write(versions.join("V0000000998"), &v1_old_key).unwrap();
    let r = e.run_with(&pw, &["key", "remove", &old]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("1 version object(s)") && r.error_line().contains("rekey"), "{}", r.stderr);
    fs::remove_file(versions.join("V0000000998")).unwrap();
    for (f, b) in files.iter().zip(&before) {
        let a = fs::read(f).unwrap();
        assert_eq!(a.len(), b.len());
        assert_eq!(a[152..], b[152..], "the sealed payload of {} is untouched", f.display());
        assert_eq!(hex::encode(&a[72..80]), new, "{} is under the new key", f.display());
    }
    ok(&["key", "remove", &old]);
    let keys: serde_json::Value = serde_json::from_str(&ok(&["key", "list", "--format", "json"])).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 1);
    // Everything is readable with the new key alone; the old key opens nothing now.
    for v in [&v1, &v2] {
        let _ = fs::remove_file(repo.path("o"));
        ok(&["restore", v, &repo.url("o")]);
        ok(&["deep-scrub", v]);
    }
    assert_eq!(sha256_file(&repo.path("o")), sha256_file(&repo.path("b")));
    let r = e.run(&["restore", &v1, &repo.url("o2")]);
    assert_eq!(r.code, 2);
    assert!(r.error_line().contains("does not open its keyring"), "{}", r.stderr);
}

#[test]
fn encryption_can_be_required_and_is_never_silently_dropped() {
    let repo = Repo::new();
    fs::write(repo.path("a"), mixed_image(85, 4, BS, 0)).unwrap();
    let cfg = repo.path("keepfs.toml");
    fs::write(&cfg, format!("home = \"{}\"\nrequire_encryption = true\n", repo.home().display())).unwrap();
    let c = cfg.to_str().unwrap();
    let r = repo.run(&["--config", c, "backup", &repo.url("a"), "x"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("must be encrypted (require_encryption / encrypt) but has no keyring; run `keepfs init --encrypt -S default`"), "{}", r.stderr);
    assert_eq!(repo.ls_json(None), serde_json::json!([]));

    // Passphrase from a file named in the configuration.
    fs::write(repo.path("pw"), "s3cret\n").unwrap();
    fs::write(
        &cfg,
        format!(
            "home = \"{}\"\nrequire_encryption = true\npassphrase_file = \"{}\"\n",
            repo.home().display(),
            repo.path("pw").display()
        ),
    )
    .unwrap();
    repo.ok(&["--config", c, "init", "--encrypt"]);
    let v = repo.ok(&["--config", c, "backup", &repo.url("a"), "x", "-b", "64k"]).trim().to_string();
    repo.ok(&["--config", c, "restore", &v, &repo.url("o")]);
    assert_eq!(sha256_file(&repo.path("o")), sha256_file(&repo.path("a")));

    // The keyring object disappears: keepfs refuses instead of writing plaintext.
    fs::rename(repo.storage().join("keyring"), repo.path("keyring.saved")).unwrap();
    let r = repo.run(&["backup", &repo.url("a"), "x", "-b", "64k"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.error_line().contains("is encrypted (the database says so) but its keyring object is missing"),
        "{}",
        r.stderr
    );
    fs::rename(repo.path("keyring.saved"), repo.storage().join("keyring")).unwrap();
    repo.ok(&["--config", c, "backup", &repo.url("a"), "x", "-b", "64k"]);
}

/// The filesystem over an encrypted repository: versions read back in plaintext through
/// the mount, and a `cp` into incoming/ is stored sealed.
#[test]
fn the_filesystem_serves_an_encrypted_repository() {
    use common::mount::Mount;
    let e = Enc::new();
    let repo = &e.repo;
    let img = mixed_image(86, 16, BS, 100);
    fs::write(repo.path("a"), &img).unwrap();
    let v = e.backup("a", "enc");
    let cfg = repo.path("keepfs.toml");
    fs::write(&cfg, format!("home = \"{}\"\nkey_file = \"{}\"\n", repo.home().display(), e.key.display())).unwrap();
    let before = repo.block_objects();
    let mut m = Mount::new(repo, &["--config", cfg.to_str().unwrap()]);
    assert_eq!(sha256_file(&m.p(&format!("by_version/{v}/data"))), sha256_file(&repo.path("a")));
    let other = mixed_image(87, 8, BS, 0);
    fs::write(repo.path("b"), &other).unwrap();
    let st = std::process::Command::new("cp").arg(repo.path("b")).arg(m.p("incoming/vm2")).status().unwrap();
    assert!(st.success());
    m.unmount();
    let ls = repo.ls_json(Some("name == \"vm2\""));
    let uid = ls[0]["uid"].as_str().unwrap().to_string();
    assert_eq!(ls[0]["status"], "valid");
    assert_eq!(e.restore_sha(&uid), sha256_file(&repo.path("b")));
    let after = files_under(&repo.storage().join("blocks"));
    assert!(after.len() > before);
    for f in &after {
        let bytes = fs::read(f).unwrap();
        assert_eq!(u16::from_le_bytes([bytes[12], bytes[13]]) & 2, 2, "{} is not sealed", f.display());
    }

    // A mount given a key that does not open the keyring: its client asked for nothing
    // wrong, so the answer is EACCES, not EINVAL, and the log names the key it needs.
    let wrong = repo.path("wrong.key");
    e.ok(&["key", "new", wrong.to_str().unwrap()]);
    fs::write(&cfg, format!("home = \"{}\"\nkey_file = \"{}\"\n", repo.home().display(), wrong.display())).unwrap();
    let m = Mount::new(repo, &["--config", cfg.to_str().unwrap()]);
    let err = fs::File::open(m.p(&format!("by_version/{v}/data"))).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    let err = fs::File::create(m.p("incoming/vm3")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    assert!(m.log_text().contains("does not open its keyring"), "{}", m.log_text());
}

/// On a terminal with no key configured, keepfs asks for the passphrase without echo
/// (run under `script`, which gives the command a pseudo-terminal).
#[test]
fn the_passphrase_is_asked_for_on_a_terminal() {
    let repo = Repo::new();
    fs::write(repo.path("a"), mixed_image(88, 4, BS, 0)).unwrap();
    let with_pw = |args: &[&str]| {
        let out = repo.command(args).env("KEEPFS_PASSPHRASE", "typed secret").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    with_pw(&["init", "--encrypt"]);
    let v = with_pw(&["backup", &repo.url("a"), "tty", "-b", "64k"]);
    let catalog = repo.catalog.as_ref().map(|d| format!("KEEPFS_DATABASE={}", d.url)).unwrap_or_default();
    let cmd = format!(
        "env -u KEEPFS_PASSPHRASE -u KEEPFS_KEY_FILE -u KEEPFS_CONFIG {catalog} KEEPFS_HOME={} {} restore {v} {}",
        repo.home().display(),
        KEEPFS,
        repo.url("o")
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"typed secret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(screen.contains("Passphrase for storage 'default' (key "), "{screen}");
    assert_eq!(sha256_file(&repo.path("o")), sha256_file(&repo.path("a")));
}

/// `key rekey` pages the objects to move out of the catalog (256 at a time, in id
/// order) instead of listing every one first: with 700 objects it goes through three
/// pages, an object missing from the first page does not stop it or make it go round
/// again, and the next rekey moves just that one.
#[test]
fn rekey_pages_through_many_objects() {
    let e = Enc::new();
    let repo = &e.repo;
    fs::write(repo.path("a"), random_bytes(97, 700 * 4096)).unwrap();
    let v = e.ok(&["backup", &repo.url("a"), "many", "-b", "4k"]).trim().to_string();
    let key2 = repo.path("second.key");
    e.ok(&["key", "new", key2.to_str().unwrap()]);
    e.ok(&["key", "rotate", "--new-key-file", key2.to_str().unwrap()]);
    let new = [("KEEPFS_KEY_FILE", key2.to_str().unwrap())];
    // The object with the smallest id is in the first page whatever the ids are.
    let mut blocks = files_under(&repo.storage().join("blocks"));
    blocks.sort_by_key(|p| p.file_name().unwrap().to_os_string());
    assert_eq!(blocks.len(), 700);
    let parked = repo.path("parked");
    fs::rename(&blocks[0], &parked).unwrap();
    let r = e.run_with(&new, &["key", "rekey"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // 699 blocks and the version object.
    assert!(r.stderr.contains("rewrapped 700 object(s)"), "{}", r.stderr);
    assert!(r.stderr.contains("1 listed object(s) were gone"), "{}", r.stderr);
    fs::rename(&parked, &blocks[0]).unwrap();
    let r = e.run_with(&new, &["key", "rekey"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("rewrapped 1 object(s)"), "only the parked block is left: {}", r.stderr);
    let old_id = {
        let keys: serde_json::Value =
            serde_json::from_str(&e.run_with(&new, &["key", "list", "--format", "json"]).stdout).unwrap();
        keys[0]["id"].as_str().unwrap().to_string()
    };
    let r = e.run_with(&new, &["key", "remove", &old_id]);
    assert_eq!(r.code, 0, "every object moved: {}", r.stderr);
    let r = e.run_with(&new, &["deep-scrub", &v]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

/// A keyring is one object: two key commands at once (on two hosts of a shared catalog,
/// say) would each write back the keyring they read, and the later one would drop the
/// other's key. One key command runs at a time per storage; the next is refused with one
/// line while it runs. And a process that read the keyring before a rotation (a backup
/// here; a mount or NBD server alike) seals with the old key for as long as it runs, so
/// `key remove` is refused until it has ended: removing the key under it would leave
/// its new objects unreadable.
#[test]
fn key_changes_wait_for_each_other_and_for_what_may_still_use_the_old_key() {
    let e = Enc::new();
    let repo = &e.repo;
    let config = repo.engine_config();
    let key2 = repo.path("second.key");
    e.ok(&["key", "new", key2.to_str().unwrap()]);

    // Another key command holds the keyring (its session lives in this test process).
    let mut other = keepfs::catalog::open(&config.catalog_location(), config.modes).unwrap();
    let sid = other.register_session("key rotate", false).unwrap();
    assert_eq!(other.claim("keyring/default", sid).unwrap(), None);
    let r = e.run(&["key", "rotate", "--new-key-file", key2.to_str().unwrap()]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.error_line().contains("the keyring of storage 'default' is being changed by a key rotate (pid"),
        "{}",
        r.stderr
    );
    let keys: serde_json::Value = serde_json::from_str(&e.ok(&["key", "list", "--format", "json"])).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 1, "nothing changed: {keys}");
    other.release("keyring/default", sid).unwrap();
    other.end_session(sid).unwrap();

    // A backup started under the old key is stopped half way; the key is rotated and
    // every recorded object rekeyed meanwhile.
    fs::write(repo.path("a"), random_bytes(98, 600 * 4096)).unwrap();
    let url = repo.url("a");
    let key = e.key.to_str().unwrap().to_string();
    let mut child = repo.command(&["backup", &url, "slow", "-b", "4k"]).env("KEEPFS_KEY_FILE", &key).spawn().unwrap();
    let frozen = repo.freeze_backup(&child, "some objects to be recorded", |s| {
        s.status.as_deref() == Some("incomplete") && s.recorded > 0
    });
    e.ok(&["key", "rotate", "--new-key-file", key2.to_str().unwrap()]);
    let new = [("KEEPFS_KEY_FILE", key2.to_str().unwrap())];
    let keys: serde_json::Value =
        serde_json::from_str(&e.run_with(&new, &["key", "list", "--format", "json"]).stdout).unwrap();
    let old = keys[0]["id"].as_str().unwrap().to_string();
    assert_eq!(e.run_with(&new, &["key", "rekey"]).code, 0);
    let r = e.run_with(&new, &["key", "remove", &old]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("may still seal new objects with an older key"), "{}", r.stderr);
    assert!(r.error_line().contains("(e.g. backup"), "{}", r.stderr);

    // The backup goes on, still sealing with the old key; once it has ended, a rekey
    // moves what it wrote and the old key can go. Everything reads with the new key.
    frozen.resume();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let v = repo.ls_json(None).as_array().unwrap().iter().find(|v| v["name"] == "slow").unwrap()["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let r = e.run_with(&new, &["key", "remove", &old]);
    assert_eq!(r.code, 4, "objects the backup sealed with the old key: {}", r.stderr);
    assert!(r.error_line().contains("run `keepfs key rekey"), "{}", r.stderr);
    assert_eq!(e.run_with(&new, &["key", "rekey"]).code, 0);
    let r = e.run_with(&new, &["key", "remove", &old]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = e.run_with(&new, &["restore", &v, &repo.url("out")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(sha256_file(&repo.path("out")), sha256_file(&repo.path("a")));
}
