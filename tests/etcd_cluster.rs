//! The etcd test harness itself (tests/common/etcd.rs): a real 3-member cluster comes up,
//! keeps serving writes when its leader stops, takes the member back, survives a full
//! stop and restart with its data, and its members never outlive the test binary; the
//! TLS variant authenticates by client certificate and by password and confines user
//! `cp` to its prefix. Skips (with a note) without etcd, except under CI.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::etcd::{EtcdCluster, TLS_PREFIX};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The value of `key` read (linearizably) through `etcdctl get --print-value-only`.
fn get(cluster: &EtcdCluster, key: &str) -> String {
    let out = cluster.etcdctl(&["get", key, "--print-value-only"]);
    ok(&out, &format!("get {key}")).trim_end().to_owned()
}

#[test]
fn three_members_keep_serving_while_the_leader_is_away() {
    let t0 = Instant::now();
    let Some(mut cluster) = EtcdCluster::start(3) else {
        return;
    };
    eprintln!("3 members healthy after {:?}", t0.elapsed());

    let endpoints = cluster.endpoints();
    assert_eq!(endpoints.len(), 3);
    for e in &endpoints {
        assert!(e.starts_with("127.0.0.1:"), "{e}");
    }
    assert_eq!(
        cluster.store_url("/fleet"),
        format!("etcd://{}/fleet", endpoints.join(","))
    );
    assert_eq!(
        cluster.store_url("fleet"),
        format!("etcd://{}/fleet", endpoints.join(","))
    );

    ok(&cluster.etcdctl(&["put", "/t/a", "one"]), "put /t/a");
    assert_eq!(get(&cluster, "/t/a"), "one");
    ok(&cluster.etcdctl(&["put", "/t/b", "two\tbytes"]), "put /t/b");
    assert_eq!(
        cluster.raw_get_prefix("/t/"),
        vec![
            ("/t/a".to_owned(), b"one".to_vec()),
            ("/t/b".to_owned(), b"two\tbytes".to_vec())
        ]
    );
    assert!(cluster.raw_get_prefix("/nothing/").is_empty());

    let leader = cluster.leader();
    let t_stop = Instant::now();
    cluster.stop_member(leader);
    eprintln!("leader {leader} stopped in {:?}", t_stop.elapsed());
    assert!(!cluster.is_running(leader));

    // A write succeeds again once the other two have elected a new leader.
    let t_put = Instant::now();
    loop {
        let out = cluster.etcdctl(&["put", "/t/c", "three", "--command-timeout=1s"]);
        if out.status.success() {
            break;
        }
        assert!(
            t_put.elapsed() < Duration::from_secs(5),
            "no write within 5 s of stopping the leader: {}\n{}",
            text(&out.stderr),
            cluster.log_tails()
        );
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "write accepted {:?} after the leader stopped",
        t_put.elapsed()
    );
    let new_leader = cluster.leader();
    assert_ne!(new_leader, leader);

    let t_back = Instant::now();
    cluster.start_member(leader);
    eprintln!("member {leader} healthy again after {:?}", t_back.elapsed());
    assert!(cluster.is_running(leader));
    // The member that was away has caught up: a read on it alone sees the write.
    let out = cluster
        .etcdctl_bare()
        .arg(format!("--endpoints=http://{}", cluster.endpoint(leader)))
        .args(["get", "/t/c", "--print-value-only"])
        .output()
        .expect("etcdctl");
    assert_eq!(ok(&out, "get on the restarted member").trim_end(), "three");

    // A follower killed outright comes back too.
    let follower = (0..3).find(|&i| i != cluster.leader()).expect("a follower");
    cluster.kill_member(follower);
    ok(&cluster.etcdctl(&["put", "/t/d", "four"]), "put /t/d");
    cluster.start_member(follower);
    assert_eq!(get(&cluster, "/t/d"), "four");
    assert!(
        cluster.member_log(follower).contains("\"level\""),
        "zap logs to the member's file"
    );
}

#[test]
fn a_stopped_cluster_restarts_with_its_data() {
    let Some(mut cluster) = EtcdCluster::start(3) else {
        return;
    };
    ok(&cluster.etcdctl(&["put", "/kept", "value"]), "put");
    let t0 = Instant::now();
    cluster.stop_all();
    eprintln!("all 3 stopped in {:?}", t0.elapsed());
    assert!((0..3).all(|i| !cluster.is_running(i)));
    let out = cluster.etcdctl(&[
        "put",
        "/lost",
        "x",
        "--dial-timeout=300ms",
        "--command-timeout=1s",
    ]);
    assert!(
        !out.status.success(),
        "a put with every member down succeeded"
    );

    let t1 = Instant::now();
    cluster.start_all();
    eprintln!("all 3 healthy again after {:?}", t1.elapsed());
    assert_eq!(get(&cluster, "/kept"), "value");
    cluster.leader();
}

/// The pid of `pid` is gone or a zombie (an orphan whose reaper has not run yet).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "PID (comm) STATE ...": comm may hold spaces; the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
    }
}

const CHILD_VAR: &str = "CREDPROXY_ETCD_HARNESS_CHILD";

/// Runs as its own child process: there it starts a cluster from a thread that then
/// exits (as a test's thread does), checks the members outlived that thread, prints their
/// pids and exits without dropping the cluster. The parent checks the members die with it.
#[test]
fn members_die_with_the_test_binary() {
    if std::env::var_os(CHILD_VAR).is_some() {
        let cluster = thread::spawn(|| EtcdCluster::start(2))
            .join()
            .expect("start thread");
        let Some(cluster) = cluster else {
            println!("ETCD_PIDS=");
            return;
        };
        println!("ETCD_DIR={}", cluster.dir().display());
        thread::sleep(Duration::from_millis(300));
        let pids: Vec<u32> = (0..2).map(|i| cluster.pid(i).expect("running")).collect();
        assert!(
            pids.iter().all(|&p| !dead(p)),
            "a member died with its thread"
        );
        cluster.leader();
        println!(
            "ETCD_PIDS={}",
            pids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        std::process::exit(0);
    }

    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args([
            "--exact",
            "members_die_with_the_test_binary",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_VAR, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the test binary");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut pids = None;
    let mut dir = None;
    for line in stdout.lines() {
        let line = line.expect("read");
        if let Some((_, path)) = line.split_once("ETCD_DIR=") {
            dir = Some(std::path::PathBuf::from(path));
        }
        // The harness prints "test NAME ... " before the test's own output.
        if let Some((_, list)) = line.split_once("ETCD_PIDS=") {
            pids = Some(
                list.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|p| p.parse::<u32>().expect("pid"))
                    .collect::<Vec<_>>(),
            );
        }
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "the child test binary: {status}");
    let pids = pids.expect("the child printed its members' pids");
    if pids.is_empty() {
        return; // no etcd here: the child skipped
    }
    let t0 = Instant::now();
    while !pids.iter().all(|&p| dead(p)) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "etcd members {pids:?} outlived the test binary"
        );
        thread::sleep(Duration::from_millis(20));
    }
    // The child exited without dropping its cluster: its directory is ours to remove.
    let dir = dir.expect("the child printed its cluster's directory");
    assert!(dir.join("m0").is_dir(), "{}", dir.display());
    std::fs::remove_dir_all(&dir).expect("remove the child's cluster directory");
}

#[test]
fn tls_cluster_authenticates_by_certificate_and_password() {
    let t0 = Instant::now();
    let Some((cluster, tls)) = EtcdCluster::start_tls(3) else {
        return;
    };
    eprintln!("3 TLS members with auth ready after {:?}", t0.elapsed());
    assert_eq!(tls.prefix, TLS_PREFIX);
    assert_eq!(tls.user, "cp");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&tls.password_file)
            .expect("password file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let password = tls.password();
    assert!(!password.is_empty());

    let https = cluster
        .urls()
        .into_iter()
        .filter(|u| u.starts_with("https://"))
        .collect::<Vec<_>>()
        .join(",");
    let http = cluster
        .endpoints()
        .iter()
        .map(|e| format!("http://{e}"))
        .collect::<Vec<_>>()
        .join(",");
    let with_cert = |args: &[&str]| {
        cluster
            .etcdctl_bare()
            .arg(format!("--endpoints={https}"))
            .arg("--cacert")
            .arg(&tls.ca)
            .arg("--cert")
            .arg(&tls.client_cert)
            .arg("--key")
            .arg(&tls.client_key)
            .args(["--dial-timeout=1s", "--command-timeout=2s"])
            .args(args)
            .output()
            .expect("etcdctl")
    };
    let key = format!("{TLS_PREFIX}by-cert");

    // The client certificate (CN=cp) acts as user cp: its prefix is writable...
    ok(&with_cert(&["put", &key, "v1"]), "put with the client cert");
    let out = with_cert(&["get", &key, "--print-value-only"]);
    assert_eq!(ok(&out, "get with the client cert").trim_end(), "v1");
    // ...and nothing outside it.
    let out = with_cert(&["put", "/elsewhere", "x"]);
    assert!(!out.status.success(), "cp wrote outside its prefix");
    assert!(
        text(&out.stderr).contains("permission denied"),
        "{}",
        text(&out.stderr)
    );
    let out = with_cert(&["get", "/elsewhere"]);
    assert!(!out.status.success(), "cp read outside its prefix");

    // The password authenticates cp as well; a wrong one is refused.
    let user = format!("--user=cp:{password}");
    let out = with_cert(&[&user, "put", &format!("{TLS_PREFIX}by-password"), "v2"]);
    ok(&out, "put with the password");
    let out = with_cert(&["--user=cp:wrong", "put", &format!("{TLS_PREFIX}x"), "v"]);
    assert!(!out.status.success(), "a wrong password was accepted");
    assert!(
        text(&out.stderr).contains("authentication failed"),
        "{}",
        text(&out.stderr)
    );
    // The harness's own root certificate sees everything cp wrote.
    assert_eq!(
        cluster.raw_get_prefix(TLS_PREFIX),
        vec![
            (format!("{TLS_PREFIX}by-cert"), b"v1".to_vec()),
            (format!("{TLS_PREFIX}by-password"), b"v2".to_vec())
        ]
    );

    // Without TLS, or over TLS without a client certificate, nothing gets through.
    let plain = cluster
        .etcdctl_bare()
        .arg(format!("--endpoints={http}"))
        .args(["--dial-timeout=500ms", "--command-timeout=1s"])
        .args(["put", &format!("{TLS_PREFIX}plain"), "x"])
        .output()
        .expect("etcdctl");
    assert!(!plain.status.success(), "a plain-HTTP put succeeded");
    let no_cert = cluster
        .etcdctl_bare()
        .arg(format!("--endpoints={https}"))
        .arg("--cacert")
        .arg(&tls.ca)
        .args(["--dial-timeout=500ms", "--command-timeout=1s"])
        .arg(&user)
        .args(["put", &format!("{TLS_PREFIX}nocert"), "x"])
        .output()
        .expect("etcdctl");
    assert!(
        !no_cert.status.success(),
        "a put without a client cert succeeded"
    );
    assert_eq!(cluster.raw_get_prefix(TLS_PREFIX).len(), 2);
}
