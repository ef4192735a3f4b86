//! The FUSE filesystem through a real kernel mount: browse, read, back up with cp and dd,
//! loop-mount ext4 images read-only and read-write (copy-on-write), errno values, and
//! versions coming and going while mounted. Needs root and /dev/fuse (CI has both).

mod common;
use common::mount::{Mount, wait_until};
use common::*;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(20);

fn sh(cmd: &str) -> std::process::Output {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

fn uids_named(repo: &Repo, name: &str) -> Vec<String> {
    repo.ls_json(Some(&format!("name == \"{name}\"")))
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["status"] != "incomplete")
        .map(|v| v["uid"].as_str().unwrap().to_string())
        .collect()
}

/// Waits for the single valid version called `name` and returns its uid.
fn version_named(repo: &Repo, name: &str) -> String {
    wait_until(&format!("version {name}"), LIMIT, || !uids_named(repo, name).is_empty());
    let u = uids_named(repo, name);
    assert_eq!(u.len(), 1, "{u:?}");
    u[0].clone()
}

#[test]
fn browse_and_read_versions() {
    let repo = Repo::new();
    let img = mixed_image(71, 9, 1 << 20, 333);
    fs::write(repo.path("img"), &img).unwrap();
    let a = repo.backup("img", "db", &["-b", "1M", "-l", "env=prod", "-s", "snap1"]);
    let b = repo.backup("img", "db", &[]);
    let m = Mount::new(&repo, &[]);

    assert_eq!(sha256_file(&m.p(&format!("by_version/{a}/data"))), sha256_file(&repo.path("img")));
    assert_eq!(fs::metadata(m.p(&format!("by_version/{a}/data"))).unwrap().len(), img.len() as u64);
    let field = |uid: &str, f: &str| fs::read_to_string(m.p(&format!("by_version/{uid}/{f}"))).unwrap();
    assert_eq!(field(&a, "name"), "db\n");
    assert_eq!(field(&a, "snapshot"), "snap1\n");
    assert_eq!(field(&a, "size"), format!("{}\n", img.len()));
    assert_eq!(field(&a, "block_size"), "1048576\n");
    assert_eq!(field(&a, "status"), "valid\n");
    assert_eq!(field(&a, "protected"), "false\n");
    assert_eq!(field(&a, "labels"), "env=prod\n");
    assert_eq!(field(&b, "labels"), "");
    let date = field(&a, "date");
    assert!(date.ends_with("Z\n") && date.starts_with("20"), "{date}");

    let mut listed: Vec<String> =
        fs::read_dir(m.p("by_name/db")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    listed.sort();
    assert_eq!(listed, vec![a.clone(), b.clone(), "latest".to_string()]);
    assert_eq!(
        fs::read_link(m.p(&format!("by_name/db/{a}"))).unwrap().to_str(),
        Some(&*format!("../../by_version/{a}"))
    );
    assert_eq!(fs::read_link(m.p("by_name/db/latest")).unwrap().to_str(), Some(&*format!("../../by_version/{b}")));
    assert_eq!(sha256_file(&m.p("by_name/db/latest/data")), sha256_file(&repo.path("img")));

    // Random reads match the image.
    let f = fs::File::open(m.p(&format!("by_version/{b}/data"))).unwrap();
    for (off, len) in
        [(0usize, 10usize), (4 << 20, 4096), ((1 << 20) - 7, 100), (img.len() - 50, 50), (img.len() - 1, 10)]
    {
        let mut buf = vec![0u8; len];
        let n = f.read_at(&mut buf, off as u64).unwrap();
        assert_eq!(&buf[..n], &img[off..(off + len).min(img.len())]);
    }

    // A version created by the CLI while mounted appears; one removed disappears.
    let c = repo.backup("img", "web", &[]);
    wait_until("the new version to show", LIMIT, || m.p(&format!("by_version/{c}/data")).exists());
    assert!(m.p("by_name/web/latest").exists());
    repo.ok(&["rm", "--force", &c]);
    wait_until("the removed version to go", LIMIT, || !m.p(&format!("by_version/{c}")).exists());
    // by_name/web's own entry may be cached by the kernel a moment longer (the mount's
    // name TTL): it goes too, without a new lookup of anything else.
    wait_until("its name to go", LIMIT, || !m.p("by_name/web").exists());
}

#[test]
fn cp_and_dd_into_incoming_are_backups() {
    let repo = Repo::new();
    let img = mixed_image(72, 20, 1 << 20, 4321);
    fs::write(repo.path("img"), &img).unwrap();
    let m = Mount::new(&repo, &[]);
    let src = repo.path("img");
    let want = sha256_file(&src);

    sh(&format!("cp {} {}", src.display(), m.p("incoming/vm1").display()));
    let v1 = version_named(&repo, "vm1");
    assert!(!m.p("incoming/vm1").exists(), "the file leaves incoming/ once committed");
    assert_eq!(repo.restore_sha(&v1, "o1"), want);
    assert_eq!(sha256_file(&m.p(&format!("by_version/{v1}/data"))), want);
    let objects = repo.block_objects();

    // The same image again stores no new object.
    sh(&format!("cp {} {}", src.display(), m.p("incoming/vm1-again").display()));
    let again = version_named(&repo, "vm1-again");
    assert_eq!(repo.block_objects(), objects);
    assert_eq!(repo.version(&again)["stats"]["bytes_written"], 0);

    for (name, args) in [("dd4m", "bs=4M"), ("dd512", "bs=512")] {
        sh(&format!("dd if={} of={} {args} status=none", src.display(), m.p(&format!("incoming/{name}")).display()));
        let v = version_named(&repo, name);
        assert_eq!(repo.restore_sha(&v, "o"), want, "{name}");
    }

    // seek past the start and conv=notrunc,sparse: a hole, then the image.
    sh(&format!(
        "dd if={} of={} bs=64k seek=5 conv=notrunc,sparse status=none",
        src.display(),
        m.p("incoming/ddseek").display()
    ));
    let v = version_named(&repo, "ddseek");
    let mut expected = vec![0u8; 5 * 65536];
    expected.extend_from_slice(&img);
    fs::write(repo.path("expected"), &expected).unwrap();
    assert_eq!(repo.restore_sha(&v, "o"), sha256_file(&repo.path("expected")));
    assert_eq!(repo.version(&v)["size"], expected.len() as u64);
}

#[test]
fn an_incoming_file_behaves_like_a_file_until_closed() {
    let repo = Repo::new();
    let m = Mount::new(&repo, &[]);
    let path = m.p("incoming/live");
    let mut f = fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
    let a = random_bytes(81, 6 << 20);
    f.write_all(&a).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), a.len() as u64, "stat shows the size");
    let mut back = vec![0u8; 1000];
    f.read_exact_at(&mut back, 5 << 20).unwrap();
    assert_eq!(back, a[5 << 20..(5 << 20) + 1000]);

    // Labels and snapshot name through extended attributes.
    let set = |n: &str, v: &str| {
        let ok = Command::new("setfattr").args(["-n", n, "-v", v]).arg(&path).status().unwrap().success();
        assert!(ok, "setfattr {n}");
    };
    set("user.keepfs.label.env", "prod");
    set("user.keepfs.label.tier", "");
    set("user.keepfs.snapshot", "snap-9");

    // Another process writes in the middle without truncating.
    sh(&format!("printf 'XYZ' | dd of={} bs=1 seek=100 conv=notrunc status=none", path.display()));
    let mut model = a.clone();
    model[100..103].copy_from_slice(b"XYZ");
    // Extend with a hole, then truncate back into the image.
    f.set_len(9 << 20).unwrap();
    let mut tail = vec![7u8; 16];
    f.read_exact_at(&mut tail, (8 << 20) - 8).unwrap();
    assert_eq!(tail, vec![0u8; 16], "holes read as zeros");
    f.set_len(3 << 20).unwrap();
    model.truncate(3 << 20);
    f.seek(SeekFrom::Start(4 << 20)).unwrap();
    f.write_all(b"end").unwrap();
    model.resize(4 << 20, 0);
    model.extend_from_slice(b"end");
    drop(f);

    let v = version_named(&repo, "live");
    let ver = repo.version(&v);
    assert_eq!(ver["labels"]["env"], "prod");
    assert_eq!(ver["labels"]["tier"], "");
    assert_eq!(ver["snapshot"], "snap-9");
    fs::write(repo.path("model"), &model).unwrap();
    assert_eq!(repo.restore_sha(&v, "o"), sha256_file(&repo.path("model")));
}

#[test]
fn ext4_images_mount_read_only_and_read_write_with_copy_on_write() {
    let repo = Repo::new();
    let tree = repo.path("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("hello.txt"), "hello from keepfs\n").unwrap();
    fs::write(tree.join("sub/random.bin"), random_bytes(91, 3 << 20)).unwrap();
    let img = repo.path("fs.img");
    fs::File::create(&img).unwrap().set_len(48 << 20).unwrap();
    sh(&format!("mkfs.ext4 -q -F -d {} {}", tree.display(), img.display()));
    let original_sha = sha256_file(&img);
    let uid = repo.backup("fs.img", "fs", &[]);
    let m = Mount::new(&repo, &[]);
    let data = m.p(&format!("by_version/{uid}/data"));
    let mnt = repo.path("loop");
    fs::create_dir_all(&mnt).unwrap();

    sh(&format!("mount -o loop,ro {} {}", data.display(), mnt.display()));
    let hello = fs::read_to_string(mnt.join("hello.txt"));
    let random = fs::read(mnt.join("sub/random.bin"));
    sh(&format!("umount {}", mnt.display()));
    assert_eq!(hello.unwrap(), "hello from keepfs\n");
    assert_eq!(random.unwrap(), random_bytes(91, 3 << 20));

    sh(&format!("mount -o loop {} {}", data.display(), mnt.display()));
    let w = fs::write(mnt.join("written-through-keepfs.txt"), "copy on write\n");
    sh(&format!("umount {}", mnt.display()));
    w.unwrap();

    wait_until("the copy-on-write version", LIMIT, || uids_named(&repo, "fs").len() == 2);
    let cow = uids_named(&repo, "fs").into_iter().find(|u| *u != uid).unwrap();
    assert_eq!(repo.version(&cow)["labels"]["keepfs.cow-of"], uid.as_str());
    // The original is byte for byte what it was, through the mount and restored.
    assert_eq!(sha256_file(&data), original_sha);
    assert_eq!(repo.restore_sha(&uid, "orig"), original_sha);
    // The new version holds the file.
    let cow_data = m.p(&format!("by_version/{cow}/data"));
    sh(&format!("mount -o loop,ro {} {}", cow_data.display(), mnt.display()));
    let written = fs::read_to_string(mnt.join("written-through-keepfs.txt"));
    let hello = fs::read_to_string(mnt.join("hello.txt"));
    sh(&format!("umount {}", mnt.display()));
    assert_eq!(written.unwrap(), "copy on write\n");
    assert_eq!(hello.unwrap(), "hello from keepfs\n");
}

/// A version's sparse blocks are holes of its mounted `data` (SEEK_DATA / SEEK_HOLE), so
/// tools that copy sparse files, and a keepfs backup of the mounted file, skip them.
#[test]
fn sparse_blocks_are_holes_of_the_mounted_data() {
    use std::os::unix::io::AsRawFd;
    const B: u64 = 64 * 1024;
    let repo = Repo::new();
    let img = repo.path("thin.img");
    sparse_file(
        &img,
        4096 * B,
        &[(3 * B + 100, &random_bytes(31, 1000)), (1000 * B, &random_bytes(32, 2 * B as usize))],
    );
    let uid = repo.backup("thin.img", "thin", &["-b", "64k"]);
    let m = Mount::new(&repo, &[]);
    let data = m.p(&format!("by_version/{uid}/data"));
    let file = fs::File::open(&data).unwrap();
    let seek = |offset: u64, whence: i32| -> Result<u64, i32> {
        // SAFETY: lseek on a descriptor this test holds open.
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, whence) };
        if r < 0 { Err(std::io::Error::last_os_error().raw_os_error().unwrap()) } else { Ok(r as u64) }
    };
    assert_eq!(seek(0, libc::SEEK_DATA), Ok(3 * B));
    assert_eq!(seek(0, libc::SEEK_HOLE), Ok(0));
    assert_eq!(seek(3 * B + 5, libc::SEEK_DATA), Ok(3 * B + 5));
    assert_eq!(seek(3 * B, libc::SEEK_HOLE), Ok(4 * B));
    assert_eq!(seek(4 * B, libc::SEEK_DATA), Ok(1000 * B));
    assert_eq!(seek(1000 * B, libc::SEEK_HOLE), Ok(1002 * B));
    assert_eq!(seek(1002 * B, libc::SEEK_DATA), Err(libc::ENXIO), "no data after the last block");
    assert_eq!(seek(2000 * B, libc::SEEK_HOLE), Ok(2000 * B));
    assert_eq!(seek(4096 * B, libc::SEEK_HOLE), Err(libc::ENXIO), "at the end");
    drop(file);

    // Backing up the mounted file reads its three data blocks only, and is the same image.
    let again = repo.ok(&["backup", &format!("file://{}", data.display()), "again", "-b", "64k"]).trim().to_string();
    let v = repo.version(&again);
    assert_eq!(v["stats"]["bytes_read"], 3 * B, "{v}");
    assert_eq!(v["stats"]["bytes_written"], 0, "every block deduplicated: {v}");
    drop(m);
    assert_eq!(repo.restore_sha(&again, "o"), sha256_file(&img));
}

#[test]
fn errno_values_for_what_the_filesystem_does_not_allow() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(101, 1 << 20)).unwrap();
    let uid = repo.backup("img", "e", &["-l", "k=v"]);
    repo.ok(&["protect", &uid]);
    let m = Mount::new(&repo, &[]);
    let dir = m.p(&format!("by_version/{uid}"));
    assert_eq!(errno_of(fs::remove_file(dir.join("data"))), libc::EPERM);
    assert_eq!(errno_of(fs::remove_dir(&dir)), libc::EPERM);
    assert_eq!(errno_of(fs::remove_dir_all(m.p("by_name/e"))), libc::EPERM);
    assert_eq!(errno_of(fs::create_dir(m.p("by_version/new"))), libc::EPERM);
    assert_eq!(errno_of(fs::create_dir(m.p("incoming/dir"))), libc::EPERM);
    assert_eq!(errno_of(fs::create_dir(m.p("elsewhere"))), libc::EPERM);
    assert_eq!(errno_of(fs::rename(&dir, m.p("by_version/V0000000099"))), libc::EPERM);
    assert_eq!(errno_of(fs::File::create(dir.join("extra"))), libc::EPERM);
    assert_eq!(errno_of(fs::OpenOptions::new().write(true).open(dir.join("name"))), libc::EACCES);
    assert_eq!(errno_of(fs::metadata(m.p("by_version/V0000000099"))), libc::ENOENT);
    assert!(fs::read_to_string(dir.join("protected")).unwrap() == "true\n");
    // Still there and intact.
    assert_eq!(sha256_file(&dir.join("data")), sha256_file(&repo.path("img")));
    // A version open through the mount cannot be removed by the CLI meanwhile.
    let f = fs::File::open(dir.join("data")).unwrap();
    let r = repo.run(&["rm", "--force", &uid]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("in use"), "{}", r.stderr);
    drop(f);
}

#[test]
fn read_only_and_discard_writes_mounts() {
    let repo = Repo::new();
    let img = random_bytes(111, 2 << 20);
    fs::write(repo.path("img"), &img).unwrap();
    let uid = repo.backup("img", "ro", &[]);
    {
        let m = Mount::new(&repo, &["--read-only"]);
        let data = m.p(&format!("by_version/{uid}/data"));
        assert_eq!(errno_of(fs::OpenOptions::new().write(true).open(&data)), libc::EROFS);
        assert_eq!(errno_of(fs::File::create(m.p("incoming/x"))), libc::EROFS);
        assert_eq!(sha256_file(&data), sha256_file(&repo.path("img")));
    }
    {
        let m = Mount::new(&repo, &["--discard-writes"]);
        let data = m.p(&format!("by_version/{uid}/data"));
        let f = fs::OpenOptions::new().read(true).write(true).open(&data).unwrap();
        f.write_all_at(b"scratch", 4096).unwrap();
        drop(f);
        let f = fs::File::open(&data).unwrap();
        let mut b = [0u8; 7];
        f.read_exact_at(&mut b, 4096).unwrap();
        assert_eq!(&b, b"scratch", "writes stay visible for the life of the mount");
    }
    // ... and are gone afterwards: no new version, the original unchanged. (Dropping the
    // mount waited for its process to exit: nothing can commit later.)
    assert_eq!(uids_named(&repo, "ro"), vec![uid.clone()]);
    let all = repo.ls_json(None);
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    assert_eq!(repo.restore_sha(&uid, "o"), sha256_file(&repo.path("img")));
}

#[test]
fn readers_writers_and_the_cli_at_the_same_time() {
    let repo = Repo::new();
    let a = mixed_image(121, 12, 1 << 20, 0);
    let b = mixed_image(122, 12, 1 << 20, 17);
    let c = mixed_image(123, 16, 1 << 20, 5);
    fs::write(repo.path("a"), &a).unwrap();
    fs::write(repo.path("b"), &b).unwrap();
    fs::write(repo.path("c"), &c).unwrap();
    let ua = repo.backup("a", "a", &[]);
    let ub = repo.backup("b", "b", &[]);
    let m = Mount::new(&repo, &[]);
    let (pa, pb) = (m.p(&format!("by_version/{ua}/data")), m.p(&format!("by_version/{ub}/data")));
    let (wa, wb, wc) = (sha256_file(&repo.path("a")), sha256_file(&repo.path("b")), sha256_file(&repo.path("c")));
    let cp_target = m.p("incoming/c");
    let c_src = repo.path("c");
    std::thread::scope(|s| {
        let r1 = s.spawn(|| (0..3).all(|_| sha256_file(&pa) == wa));
        let r2 = s.spawn(|| (0..3).all(|_| sha256_file(&pb) == wb));
        let w = s.spawn(|| sh(&format!("cp {} {}", c_src.display(), cp_target.display())));
        // And a CLI backup while all that runs.
        let cli = repo.backup("c", "c-cli", &[]);
        assert!(r1.join().unwrap() && r2.join().unwrap());
        w.join().unwrap();
        assert_eq!(repo.restore_sha(&cli, "cli"), wc);
    });
    let uc = version_named(&repo, "c");
    assert_eq!(repo.restore_sha(&uc, "oc"), wc);
    assert_eq!(sha256_file(&m.p(&format!("by_version/{uc}/data"))), wc);
}

#[test]
fn kill_9_of_the_mount_during_a_copy() {
    let repo = Repo::new();
    fs::write(repo.path("big"), random_bytes(131, 96 << 20)).unwrap();
    fs::write(repo.path("small"), random_bytes(132, 1 << 20)).unwrap();
    let keep = repo.backup("small", "keep", &[]);
    let mut m = Mount::new(&repo, &[]);
    let target = m.p("incoming/killed");
    let mut cp = Command::new("dd")
        .arg(format!("if={}", repo.path("big").display()))
        .arg(format!("of={}", target.display()))
        .args(["bs=64k", "oflag=sync"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the copy to be under way", LIMIT, || {
        fs::metadata(&target).map(|md| md.size() > (4 << 20)).unwrap_or(false)
    });
    let mut child = m.child.take().unwrap();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let status = cp.wait().unwrap();
    assert!(!status.success(), "the copy must fail when the filesystem dies");

    // No valid version for the killed copy; the repository is consistent.
    assert!(uids_named(&repo, "killed").is_empty());
    let listed = repo.ls_json(Some("name == \"killed\""));
    assert_eq!(listed[0]["status"], "incomplete", "{listed}");
    assert_eq!(repo.restore_sha(&keep, "k"), sha256_file(&repo.path("small")));

    // The next mount detaches the dead one and works.
    let m2 = Mount::at(&repo, &m.dir.clone(), &[]);
    assert!(m2.log_text().contains("detached the dead mount"), "{}", m2.log_text());
    assert_eq!(sha256_file(&m2.p(&format!("by_version/{keep}/data"))), sha256_file(&repo.path("small")));
    drop(m2);
    // The incomplete version goes with `keepfs rm`, and cleanup takes its objects.
    let uid = listed[0]["uid"].as_str().unwrap().to_string();
    repo.ok(&["rm", &uid]);
    repo.ok(&["cleanup"]);
    assert_eq!(repo.restore_sha(&keep, "k"), sha256_file(&repo.path("small")));
}

#[test]
fn page_cache_mode_reads_the_same_bytes_and_loop_mounts() {
    let repo = Repo::new();
    let tree = repo.path("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("f.bin"), random_bytes(141, 2 << 20)).unwrap();
    let img = repo.path("fs.img");
    fs::File::create(&img).unwrap().set_len(24 << 20).unwrap();
    sh(&format!("mkfs.ext4 -q -F -d {} {}", tree.display(), img.display()));
    let uid = repo.backup("fs.img", "pc", &["-b", "1M"]);
    let m = Mount::new(&repo, &["--page-cache"]);
    let data = m.p(&format!("by_version/{uid}/data"));
    assert_eq!(sha256_file(&data), sha256_file(&img));
    assert_eq!(sha256_file(&data), sha256_file(&img), "a re-read from the page cache");
    let mnt = repo.path("loop");
    fs::create_dir_all(&mnt).unwrap();
    sh(&format!("mount -o loop,ro {} {}", data.display(), mnt.display()));
    let f = fs::read(mnt.join("f.bin"));
    // The kernel may still hold the loop device a moment after the read (a CI run saw
    // "target is busy"): unmounted once umount succeeds.
    let unmounted =
        poll_for(LIMIT, || Command::new("umount").arg(&mnt).output().ok().filter(|o| o.status.success()).map(|_| ()));
    assert!(unmounted.is_some(), "{} stayed busy for {LIMIT:?}", mnt.display());
    assert_eq!(f.unwrap(), random_bytes(141, 2 << 20));
}

#[test]
fn qemu_img_convert_into_incoming_is_a_backup() {
    let repo = Repo::new();
    let img = mixed_image(151, 10, 1 << 20, 512);
    fs::write(repo.path("img"), &img).unwrap();
    let qcow = repo.path("img.qcow2");
    sh(&format!("qemu-img convert -f raw -O qcow2 {} {}", repo.path("img").display(), qcow.display()));
    let m = Mount::new(&repo, &[]);
    // qemu-img creates the file, writes a sector, closes it and reopens it to convert:
    // its first close makes a version, which its reopen continues and replaces.
    sh(&format!("qemu-img convert -f qcow2 -O raw {} {}", qcow.display(), m.p("incoming/fromqcow").display()));
    let v = version_named(&repo, "fromqcow");
    assert_eq!(repo.restore_sha(&v, "o"), sha256_file(&repo.path("img")));
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 1, "the replaced version is gone");
    // Sizing the file first and converting with -n works too.
    let target = m.p("incoming/sized");
    sh(&format!("truncate -s {} {}", img.len(), target.display()));
    assert!(target.exists(), "a file only sized stays in incoming/");
    sh(&format!("qemu-img convert -n -f qcow2 -O raw {} {}", qcow.display(), target.display()));
    let v = version_named(&repo, "sized");
    assert_eq!(repo.restore_sha(&v, "o"), sha256_file(&repo.path("img")));
}

#[test]
fn incomplete_versions_are_hidden_and_invalid_ones_readable() {
    let repo = Repo::new();
    let bs = 1usize << 20;
    let img = mixed_image(161, 8, bs, 0);
    fs::write(repo.path("img"), &img).unwrap();
    let uid = repo.backup("img", "bad", &["-b", "1M"]);
    // Damage block 3 (random data), and let a restore find it: the version is invalid.
    let obj = repo.object_file(&img[3 * bs..4 * bs]);
    let mut bytes = fs::read(&obj).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    fs::write(&obj, &bytes).unwrap();
    assert_eq!(repo.run(&["restore", &uid, &repo.url("o")]).code, 3);

    let m = Mount::new(&repo, &[]);
    // A draft in incoming/ is an incomplete version: not under by_version/.
    let mut draft = fs::File::create(m.p("incoming/unfinished")).unwrap();
    draft.write_all(b"not yet").unwrap();
    let incomplete: Vec<String> = repo
        .ls_json(Some("status == \"incomplete\""))
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["uid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(incomplete.len(), 1);
    let listed: Vec<String> =
        fs::read_dir(m.p("by_version")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(listed, vec![uid.clone()], "only the committed version is listed");
    assert!(!m.p(&format!("by_version/{}", incomplete[0])).exists());

    // The invalid version is shown, says so, and reads except for the damaged block.
    let dir = m.p(&format!("by_version/{uid}"));
    assert_eq!(fs::read_to_string(dir.join("status")).unwrap(), "invalid\n");
    let f = fs::File::open(dir.join("data")).unwrap();
    let mut good = vec![0u8; bs];
    f.read_exact_at(&mut good, 4 * bs as u64).unwrap();
    assert_eq!(good, img[4 * bs..5 * bs]);
    let mut bad = vec![0u8; 4096];
    assert_eq!(errno_of(f.read_exact_at(&mut bad, 3 * bs as u64)), libc::EIO);
    drop(draft);
    version_named(&repo, "unfinished");
}

/// A source that fails part way through a backup (here a mounted version with a damaged
/// block, whose read answers EIO) fails it with the read's own error, in one line and
/// exit code 1, even with blocks after the failing one already stored and waiting to
/// go into the index in order; the version is left incomplete for `--continue` or
/// `rm`.
#[test]
fn a_source_that_fails_mid_backup_fails_it_with_the_read_error() {
    const MIB: u64 = 1 << 20;
    let repo = Repo::new();
    // Data in four 32 MiB windows; the block at 63 MiB (the second window's end) is
    // damaged, so that readers of the later windows have handed blocks over by then.
    let regions: Vec<(u64, Vec<u8>)> =
        [0, 62, 70, 100].iter().enumerate().map(|(i, &at)| (at * MIB, random_bytes(190 + i as u64, 2 << 20))).collect();
    let parts: Vec<(u64, &[u8])> = regions.iter().map(|(at, b)| (*at, b.as_slice())).collect();
    sparse_file(&repo.path("img"), 128 * MIB, &parts);
    let uid = repo.backup("img", "src", &["-b", "64k"]);
    let damaged = &regions[1].1[MIB as usize..MIB as usize + 65536];
    let obj = repo.object_file(damaged);
    let mut bytes = fs::read(&obj).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    fs::write(&obj, &bytes).unwrap();
    let m = Mount::new(&repo, &[]);
    let data = m.p(&format!("by_version/{uid}/data"));

    // Four readers (`source_readers`), one window each at a time.
    let other = Repo::new();
    other.set_database(&format!("{}/keepfs.sqlite", other.home().display()), "source_readers = 4\n", "");
    let cfg = other.config_file();
    let backup = ["--config", cfg.as_str(), "backup", &format!("file://{}", data.display()), "copy", "-b", "4k"];
    let r = other.run(&backup);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.error_line().contains("is left incomplete"), "{}", r.stderr);
    assert!(r.error_line().contains("cannot read") || r.error_line().contains("Input/output"), "{}", r.stderr);
    assert!(!r.stderr.contains("never recorded"), "{}", r.stderr);
    let listed: serde_json::Value =
        serde_json::from_str(&other.ok(&["--config", cfg.as_str(), "ls", "--format", "json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["status"], "incomplete");
    drop(m);
}

#[test]
fn daemon_mode_detaches_and_unmounts_cleanly() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(171, 1 << 20)).unwrap();
    let uid = repo.backup("img", "d", &[]);
    let dir = repo.path("dmnt");
    fs::create_dir_all(&dir).unwrap();
    let out = repo.command(&["mount", "--daemon", dir.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(common::mount::is_mounted(&dir), "mounted when --daemon returns");
    assert_eq!(sha256_file(&dir.join(format!("by_version/{uid}/data"))), sha256_file(&repo.path("img")));
    // SIGTERM unmounts and ends the server.
    // SAFETY: sending a signal to the child we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_until("the daemon to unmount and exit", LIMIT, || {
        !common::mount::is_mounted(&dir) && !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
}

/// Sets an extended attribute, returning the errno (0 on success).
fn setxattr(path: &std::path::Path, name: &str, value: &[u8]) -> i32 {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r == 0 { 0 } else { std::io::Error::last_os_error().raw_os_error().unwrap_or(-1) }
}

/// A file in incoming/ renamed while open stays the writer's under its new name: fstat
/// and ftruncate on its descriptor work (they answered ENOENT, and the truncate was
/// lost), `stat` of the new name works at once, and the version has the new name and
/// every change (found by a drill).
#[test]
fn a_file_renamed_while_open_in_incoming_stays_its_writers() {
    let repo = Repo::new();
    let m = Mount::new(&repo, &[]);
    let (from, to) = (m.p("incoming/fs1.tmp"), m.p("incoming/fs1"));
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).open(&from).unwrap();
    let data = random_bytes(103, 1 << 20);
    f.write_all(&data).unwrap();
    fs::rename(&from, &to).unwrap();
    assert_eq!(fs::metadata(&to).unwrap().len(), 1 << 20, "stat of the new name");
    assert_eq!(f.metadata().unwrap().len(), 1 << 20, "fstat of the renamed file's descriptor");
    f.set_len(4 << 20).unwrap();
    drop(f);
    let uid = version_named(&repo, "fs1");
    assert_eq!(repo.version(&uid)["size"], 4 << 20);
    let mut want = data.clone();
    want.resize(4 << 20, 0);
    fs::write(repo.path("want"), &want).unwrap();
    assert_eq!(repo.restore_sha(&uid, "out"), sha256_file(&repo.path("want")));
}

/// Names, snapshot names and labels go through the engine's one check in the mount as
/// on the command line: a newline or a tab in any of them is EINVAL, and the version
/// keeps what it had (a newline in a snapshot name used to break `keepfs ls`).
#[test]
fn unusable_names_and_labels_are_einval_in_incoming() {
    let repo = Repo::new();
    let m = Mount::new(&repo, &[]);
    assert_eq!(errno_of(fs::File::create(m.p("incoming/bad\nname"))), libc::EINVAL);
    let path = m.p("incoming/good");
    let mut f = fs::File::create(&path).unwrap();
    f.write_all(&random_bytes(102, 100_000)).unwrap();
    assert_eq!(setxattr(&path, "user.keepfs.snapshot", b"snap\nshot"), libc::EINVAL);
    assert_eq!(setxattr(&path, "user.keepfs.label.env", b"pr\rod"), libc::EINVAL);
    assert_eq!(setxattr(&path, "user.keepfs.label.bad label", b"x"), libc::EINVAL);
    assert_eq!(errno_of(fs::rename(&path, m.p("incoming/tab\there"))), libc::EINVAL);
    assert_eq!(setxattr(&path, "user.keepfs.snapshot", b"snap-1"), 0);
    assert_eq!(setxattr(&path, "user.keepfs.label.env", b"prod"), 0);
    drop(f);
    let uid = version_named(&repo, "good");
    let v = repo.version(&uid);
    assert_eq!((v["snapshot"].as_str(), v["labels"]["env"].as_str()), (Some("snap-1"), Some("prod")), "{v}");
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 1, "nothing else was made: {}", repo.ok(&["ls"]));
}

/// A mount with nothing open still uses the repository: `database migrate` is refused
/// while it runs (its writes after the copy would land in the catalog left behind), and
/// goes ahead once it is unmounted.
#[test]
fn an_idle_mount_keeps_the_catalog_from_being_migrated() {
    let repo = Repo::new();
    fs::write(repo.path("img"), mixed_image(72, 4, 1 << 20, 0)).unwrap();
    repo.backup("img", "db", &[]);
    let mut m = Mount::new(&repo, &[]);
    let to = repo.path("moved.sqlite");
    let r = repo.run(&["database", "migrate", "--to", to.to_str().unwrap()]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("session(s) are using the repository (e.g. serve by pid"), "{}", r.stderr);
    assert!(!to.exists() || fs::metadata(&to).unwrap().len() == 0, "nothing was copied");
    m.unmount();
    repo.ok(&["database", "migrate", "--to", to.to_str().unwrap()]);
}

/// `dd` over a mounted version of 64 KiB blocks: 600 blocks rewritten in one run, more
/// than the pipeline's own buffers at that size. The write
/// used to stop at the 256th block, unkillable (the draft waited for a buffer the blocks
/// it held would never give back). Now it finishes, and the copy-on-write version holds
/// exactly what `dd` wrote over the original.
#[test]
fn dd_over_a_small_block_version_does_not_hang() {
    let repo = Repo::new();
    let img = repo.path("img");
    fs::write(&img, random_bytes(95, 700 * 65536)).unwrap();
    let uid = repo.backup("img", "small", &["-b", "64k"]);
    let m = Mount::new(&repo, &[]);
    let data = m.p(&format!("by_version/{uid}/data"));
    fs::write(repo.path("new"), random_bytes(96, 600 * 65536)).unwrap();
    sh(&format!(
        "timeout 120 dd if={} of={} bs=1M seek=2 conv=notrunc status=none",
        repo.path("new").display(),
        data.display()
    ));
    let mut expected = fs::read(&img).unwrap();
    expected[2 << 20..(2 << 20) + 600 * 65536].copy_from_slice(&random_bytes(96, 600 * 65536));
    wait_until("the copy-on-write version", LIMIT, || uids_named(&repo, "small").len() == 2);
    let cow = uids_named(&repo, "small").into_iter().find(|u| *u != uid).unwrap();
    let restored = repo.path("restored");
    repo.ok(&["restore", &cow, &repo.url("restored")]);
    assert!(fs::read(&restored).unwrap() == expected, "the new version is not what dd wrote");
    assert_eq!(repo.restore_sha(&uid, "orig"), sha256_file(&img), "the original changed");
}

/// `mount --daemon` returns once its mount answers: over a dead mount (its server killed
/// with SIGKILL), which the new server detaches first, it used to return while the dead
/// one was still listed, and the next `ls` met "Transport endpoint is not connected".
#[test]
fn mount_daemon_over_a_dead_mount_returns_once_the_new_one_answers() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(133, 1 << 20)).unwrap();
    let uid = repo.backup("img", "d", &[]);
    let dir = repo.path("mnt");
    fs::create_dir_all(&dir).unwrap();
    let d = dir.to_str().unwrap();
    for round in 0..2 {
        let pid: i32 = repo.ok(&["mount", "--daemon", d]).trim().parse().unwrap();
        // Right away, no waiting: the mount answers.
        let listed: Vec<String> = fs::read_dir(dir.join("by_version"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(listed, vec![uid.clone()], "round {round}");
        // SAFETY: a signal to the mount server this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        wait_until("the killed server to be gone", LIMIT, || fs::metadata(format!("/proc/{pid}")).is_err());
    }
    // The last dead one: detached by hand, as an admin would.
    sh(&format!("fusermount3 -u -z {d} || umount -l {d}"));
}
