//! A real etcd cluster for the tests: `members` etcd 3.4 processes (Debian's `etcd-server`
//! and `etcd-client`) on 127.0.0.1 with free ports, data and logs in a temporary
//! directory, optionally over TLS with client certificates and authentication.
//!
//! Without `etcd`/`etcdctl` (or `openssl`, for TLS) on `PATH` the constructors print a note
//! and return `None`, so a test skips; under CI (`CI` set) that is a failure instead:
//! `.ci/run` installs `etcd-server etcd-client openssl`.
//!
//! No member outlives the test binary, even when it is killed: each etcd process gets
//! `PR_SET_PDEATHSIG(SIGKILL)`. The kernel sends that signal when the *thread* that forked
//! the child exits, not the process, and every Rust test runs on its own thread; so all
//! members are forked by one helper thread (`etcd-spawner`) that is started once and never
//! returns (its channel's sender lives in a static). It dies only with the process, and
//! then every member gets SIGKILL. Dropping an [`EtcdCluster`] kills its members (SIGKILL:
//! their data goes with the directory, so a graceful stop would only cost time) and
//! removes the directory (on `/dev/shm` when there is one; a binary killed outright leaves
//! it behind).

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// How long a (re)started cluster gets to answer `etcdctl endpoint health`.
pub const HEALTHY_WITHIN: Duration = Duration::from_secs(20);

/// How long a member gets to exit on SIGTERM before SIGKILL. A leader whose followers are
/// all gone takes about 7 s (it tries to hand over its leadership first).
pub const TERM_GRACE: Duration = Duration::from_secs(5);

/// The prefix the TLS cluster's user `cp` may read and write (and nothing else).
pub const TLS_PREFIX: &str = "/credproxy-tls/";

/// The user of the TLS cluster's client certificate and password.
pub const TLS_USER: &str = "cp";

/// How many times a start is retried when a port picked as free was taken meanwhile.
const START_ATTEMPTS: usize = 5;

/// The proxy variables: etcd and etcdctl (gRPC, Go's HTTP) must reach 127.0.0.1 directly.
const PROXY_VARS: &[&str] = &[
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

// ---------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------

/// True when `name` is an executable file in a `PATH` directory.
fn on_path(name: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        fs::metadata(dir.join(name))
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// True when every tool is on `PATH`; otherwise prints a note and returns false, or
/// panics under CI.
fn tools_present(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "CI is set but {missing:?} is not on PATH: .ci/run installs etcd-server \
             etcd-client openssl (apt); run the tests through it"
        );
    }
    eprintln!(
        "note: skipping an etcd test: {missing:?} not on PATH (Debian: apt-get install \
         etcd-server etcd-client openssl)"
    );
    false
}

// ---------------------------------------------------------------------------------------
// The spawner thread
// ---------------------------------------------------------------------------------------

struct SpawnRequest {
    cmd: Command,
    reply: Sender<io::Result<Child>>,
}

/// The sender to the one thread that forks every etcd member. It lives in a static, so
/// the thread's receive loop never ends and the thread exits only with the process.
fn spawner() -> &'static Mutex<Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("etcd-spawner".into())
            .spawn(move || {
                for SpawnRequest { mut cmd, reply } in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the etcd spawner thread");
        Mutex::new(tx)
    })
}

/// Spawns `cmd` on the spawner thread with `PR_SET_PDEATHSIG(SIGKILL)`: the child is
/// killed when the test binary exits, however it exits.
fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: the hook runs between fork and exec and only makes two system calls
    // (prctl, getppid), both async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent may have died between the fork and the prctl: then the signal
            // would never come.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(io::Error::other("the test binary exited"));
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(SpawnRequest { cmd, reply })
        .expect("the etcd spawner thread is running");
    answer.recv().expect("the etcd spawner thread answers")
}

/// A fresh directory for a cluster: on `/dev/shm` (tmpfs) when there is one with at least
/// 2 GiB free, else in the usual temporary directory. Each member preallocates a 64 MB write-ahead log and fsyncs
/// every write; on tmpfs that costs memory instead of disk space and the fsyncs are free,
/// so parallel tests on a slow or nearly full disk do not stall elections.
fn cluster_dir() -> tempfile::TempDir {
    let builder = || {
        let mut b = tempfile::Builder::new();
        b.prefix("credproxy-etcd-")
            .permissions(fs::Permissions::from_mode(0o700));
        b
    };
    // Only a roomy /dev/shm: a container's is often 64 MB, less than one member's log.
    let shm = Path::new("/dev/shm");
    // The casts are no-ops on x86_64 Linux, not everywhere.
    #[allow(clippy::unnecessary_cast)]
    let roomy = nix::sys::statvfs::statvfs(shm)
        .map(|v| (v.blocks_available() as u64).saturating_mul(v.fragment_size() as u64) >= 2 << 30)
        .unwrap_or(false);
    if shm.is_dir() && roomy {
        if let Ok(dir) = builder().tempdir_in(shm) {
            return dir;
        }
    }
    builder().tempdir().expect("tempdir")
}

/// `count` distinct ports that were free on 127.0.0.1 a moment ago (all bound at once,
/// then released). Another process may take one meanwhile: the start is then retried.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// TERM to `child`, up to [`TERM_GRACE`] for it to exit, then KILL; reaped either way.
fn terminate(child: &mut Child) {
    terminate_all(&mut [child]);
}

/// TERM to every child at once, up to [`TERM_GRACE`] in all, then KILL the rest; all reaped.
fn terminate_all(children: &mut [&mut Child]) {
    for child in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
    }
    let t0 = Instant::now();
    while t0.elapsed() < TERM_GRACE
        && children
            .iter_mut()
            .any(|c| matches!(c.try_wait(), Ok(None)))
    {
        thread::sleep(Duration::from_millis(20));
    }
    for child in children.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `cmd` to its end, panicking when it cannot be spawned or fails.
fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: spawn: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------

/// What a client of the TLS cluster needs: the CA, user `cp`'s client certificate and
/// key (CN=cp, which etcd takes as the user), and `cp`'s password in `password_file`
/// (mode 0600, the password alone on its first line). `cp`'s role has readwrite on
/// [`TLS_PREFIX`] (`/credproxy-tls/`) and nothing else; authentication is enabled.
/// The members require a client certificate on every connection (`--client-cert-auth`),
/// so a password is always given on top of one: it then decides the user instead of the
/// certificate's CN.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub user: String,
    pub password_file: PathBuf,
    /// The prefix `user` may use: [`TLS_PREFIX`].
    pub prefix: String,
}

impl EtcdTls {
    /// `cp`'s password.
    pub fn password(&self) -> String {
        fs::read_to_string(&self.password_file)
            .expect("read the password file")
            .trim_end()
            .to_owned()
    }
}

/// The server's and the harness's own files: the members' certificate (also their peer
/// certificate) and the `root` client certificate the harness's etcdctl uses.
#[derive(Clone, Debug)]
struct ServerPki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    root_cert: PathBuf,
    root_key: PathBuf,
}

/// A CA, a server certificate for IP:127.0.0.1 (rustls checks the subjectAltName, never
/// the CN) and client certificates for `root` and `cp`, all P-256, made with `openssl`
/// in `dir`.
fn make_pki(dir: &Path) -> (ServerPki, EtcdTls) {
    fs::create_dir_all(dir).expect("mkdir pki");
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).expect("chmod pki");
    let ossl = |args: &[&str], what: &str| {
        run_ok(
            Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdin(Stdio::null()),
            what,
        );
    };
    ossl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "3",
            "-subj",
            "/CN=credproxy test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        "openssl: the CA",
    );
    let leaf = |name: &str, cn: &str, ext: &str| {
        fs::write(dir.join(format!("{name}.ext")), ext).expect("write ext");
        ossl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
            &format!("openssl: the {name} key"),
        );
        ossl(
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "3",
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &format!("{name}.ext"),
            ],
            &format!("openssl: the {name} certificate"),
        );
    };
    // The members' certificate serves clients and peers and is the peers' client
    // certificate too.
    leaf(
        "server",
        "etcd-member",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
         basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth,clientAuth\n",
    );
    let client_ext = "basicConstraints=critical,CA:FALSE\n\
                      keyUsage=critical,digitalSignature\n\
                      extendedKeyUsage=clientAuth\n";
    leaf("root", "root", client_ext);
    leaf("client", TLS_USER, client_ext);
    for entry in fs::read_dir(dir).expect("read pki") {
        let path = entry.expect("entry").path();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let password_file = dir.join("cp.password");
    fs::write(&password_file, format!("{}\n", random_hex(16))).expect("write password");
    fs::set_permissions(&password_file, fs::Permissions::from_mode(0o600)).expect("chmod");
    (
        ServerPki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            root_cert: dir.join("root.pem"),
            root_key: dir.join("root.key"),
        },
        EtcdTls {
            ca: dir.join("ca.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            user: TLS_USER.to_owned(),
            password_file,
            prefix: TLS_PREFIX.to_owned(),
        },
    )
}

/// `bytes` random bytes as hex.
fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Why a start did not come up.
enum StartError {
    /// A member could not bind a port picked as free: retry with new ports.
    PortTaken,
}

/// A running etcd cluster on 127.0.0.1 (see the module's documentation).
pub struct EtcdCluster {
    members: Vec<Member>,
    /// `http` or `https`.
    scheme: &'static str,
    pki: Option<ServerPki>,
    /// Declared last: removed after the members are stopped.
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `members` members over plain HTTP and waits until all are healthy; `None`
    /// (with a note) when `etcd` or `etcdctl` is missing, a panic under CI.
    pub fn start(members: usize) -> Option<EtcdCluster> {
        if !tools_present(&["etcd", "etcdctl"]) {
            return None;
        }
        Some(EtcdCluster::launch(members, None))
    }

    /// Starts `members` members over TLS with client-certificate authentication, creates
    /// user `cp` (role: readwrite on [`TLS_PREFIX`]) and enables authentication. The
    /// harness itself (`etcdctl`, `raw_get_prefix`, health checks) uses a `root` client
    /// certificate. `None` (with a note) when `etcd`, `etcdctl` or `openssl` is missing, a
    /// panic under CI.
    pub fn start_tls(members: usize) -> Option<(EtcdCluster, EtcdTls)> {
        if !tools_present(&["etcd", "etcdctl", "openssl"]) {
            return None;
        }
        let dir = cluster_dir();
        let (pki, tls) = make_pki(&dir.path().join("pki"));
        let cluster = EtcdCluster::launch_in(dir, members, Some(pki));
        let user = format!("{TLS_USER}:{}", tls.password());
        let root = format!("root:{}", random_hex(16));
        let steps: [&[&str]; 6] = [
            &["user", "add", &root],
            &["user", "add", &user],
            &["role", "add", TLS_USER],
            &[
                "role",
                "grant-permission",
                TLS_USER,
                "--prefix=true",
                "readwrite",
                TLS_PREFIX,
            ],
            &["user", "grant-role", TLS_USER, TLS_USER],
            &["auth", "enable"],
        ];
        for args in steps {
            let out = cluster.etcdctl(args);
            assert!(
                out.status.success(),
                "etcdctl {} {}: {}",
                args[0],
                args[1],
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Some((cluster, tls))
    }

    fn launch(members: usize, pki: Option<ServerPki>) -> EtcdCluster {
        EtcdCluster::launch_in(cluster_dir(), members, pki)
    }

    /// Starts the members in `dir`, retrying with new ports when one was taken.
    fn launch_in(dir: tempfile::TempDir, members: usize, pki: Option<ServerPki>) -> EtcdCluster {
        assert!(members > 0, "a cluster needs a member");
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            scheme: if pki.is_some() { "https" } else { "http" },
            pki,
            dir,
        };
        for attempt in 1..=START_ATTEMPTS {
            let ports = free_ports(2 * members);
            cluster.members = (0..members)
                .map(|i| {
                    let name = format!("m{i}");
                    let data_dir = cluster.dir.path().join(&name);
                    let _ = fs::remove_dir_all(&data_dir);
                    fs::create_dir(&data_dir).expect("mkdir member");
                    fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o700))
                        .expect("chmod member");
                    Member {
                        log: cluster.dir.path().join(format!("{name}.log")),
                        name,
                        client_port: ports[2 * i],
                        peer_port: ports[2 * i + 1],
                        data_dir,
                        child: None,
                    }
                })
                .collect();
            for i in 0..members {
                let _ = fs::remove_file(&cluster.members[i].log);
                cluster.spawn_member(i, "new");
            }
            match cluster.wait_healthy_or_port() {
                Ok(()) => return cluster,
                Err(StartError::PortTaken) => {
                    eprintln!("note: etcd start attempt {attempt}: a port was taken; retrying");
                    cluster.stop_all();
                }
            }
        }
        panic!("etcd did not start in {START_ATTEMPTS} attempts: ports kept being taken");
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}://127.0.0.1:{}", m.name, self.scheme, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts member `i`'s process with `--initial-cluster-state state`.
    fn spawn_member(&mut self, i: usize, state: &str) {
        let initial = self.initial_cluster();
        let scheme = self.scheme;
        let m = &self.members[i];
        assert!(m.child.is_none(), "member {i} is running");
        let client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer = format!("{scheme}://127.0.0.1:{}", m.peer_port);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("open member log");
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-token", "credproxy-test"])
            .args(["--initial-cluster-state", state])
            .args(["--log-level", "warn", "--logger", "zap"]);
        if let Some(pki) = &self.pki {
            cmd.arg("--cert-file")
                .arg(&pki.server_cert)
                .arg("--key-file")
                .arg(&pki.server_key)
                .arg("--trusted-ca-file")
                .arg(&pki.ca)
                .arg("--client-cert-auth")
                .arg("--peer-cert-file")
                .arg(&pki.server_cert)
                .arg("--peer-key-file")
                .arg(&pki.server_key)
                .arg("--peer-trusted-ca-file")
                .arg(&pki.ca)
                .arg("--peer-client-cert-auth");
        }
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            // Its own process group: a terminal's ^C reaches the test binary only, whose
            // death then kills the member (PDEATHSIG).
            .process_group(0);
        let child = spawn_tied(cmd).expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    /// The running members.
    fn running(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].child.is_some())
            .collect()
    }

    /// Waits until every running member answers `endpoint health`; `PortTaken` when a
    /// member exited because a port was in use; panics on any other exit or after
    /// [`HEALTHY_WITHIN`] with the members' log tails.
    fn wait_healthy_or_port(&mut self) -> Result<(), StartError> {
        let t0 = Instant::now();
        loop {
            for i in self.running() {
                let child = self.members[i].child.as_mut().expect("running");
                if let Some(status) = child.try_wait().expect("try_wait etcd") {
                    self.members[i].child = None;
                    let log = self.member_log(i);
                    if log.contains("address already in use") {
                        return Err(StartError::PortTaken);
                    }
                    panic!(
                        "etcd member {i} exited ({status}) while starting:\n{}",
                        self.log_tails()
                    );
                }
            }
            let endpoints: Vec<String> = self.running().iter().map(|&i| self.endpoint(i)).collect();
            let out = self
                .etcdctl_on(&endpoints)
                .args([
                    "endpoint",
                    "health",
                    "--dial-timeout=500ms",
                    "--command-timeout=1s",
                ])
                .output()
                .expect("spawn etcdctl");
            if out.status.success() {
                return Ok(());
            }
            if t0.elapsed() > HEALTHY_WITHIN {
                panic!(
                    "etcd not healthy within {HEALTHY_WITHIN:?}: {}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    self.log_tails()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every running member is healthy (see [`HEALTHY_WITHIN`]); panics with
    /// the log tails otherwise. Needs a quorum running.
    pub fn wait_healthy(&mut self) {
        if self.wait_healthy_or_port().is_err() {
            panic!("an etcd member lost its port:\n{}", self.log_tails());
        }
    }

    /// The last lines of every member's log.
    pub fn log_tails(&self) -> String {
        (0..self.members.len())
            .map(|i| format!("--- member {i} ---\n{}", tail(&self.member_log(i), 15)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Member `i`'s client address, `127.0.0.1:PORT`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    /// Every member's client address, `127.0.0.1:PORT`, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Every member's client URL (`http://` or `https://`).
    pub fn urls(&self) -> Vec<String> {
        self.endpoints()
            .iter()
            .map(|e| format!("{}://{e}", self.scheme))
            .collect()
    }

    /// `etcd://127.0.0.1:P1,127.0.0.1:P2,.../PREFIX` (a leading `/` of `prefix` is not
    /// doubled).
    pub fn store_url(&self, prefix: &str) -> String {
        format!(
            "etcd://{}/{}",
            self.endpoints().join(","),
            prefix.trim_start_matches('/')
        )
    }

    /// How many members the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True while member `i`'s process runs (as far as this harness knows).
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// Member `i`'s pid, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// The temporary directory of the cluster (data, logs, PKI).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops member `i`: TERM, up to [`TERM_GRACE`], then KILL.
    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            terminate(&mut child);
        }
    }

    /// Kills member `i` with SIGKILL (and reaps it).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts member `i` on its data directory (`--initial-cluster-state existing`) and
    /// waits until every running member is healthy (a quorum must be running).
    pub fn start_member(&mut self, i: usize) {
        self.spawn_member(i, "existing");
        self.wait_healthy();
    }

    /// Stops every member: TERM to the followers (together, up to [`TERM_GRACE`], then
    /// KILL), then, once the leader has stepped down (it does within about a second of
    /// losing its quorum), the same to it. A leader that gets TERM while it still counts
    /// its followers as connected spends up to 7 s trying to hand its leadership to them;
    /// this way every member exits within tens of milliseconds. Without a leader they all
    /// get TERM at once.
    pub fn stop_all(&mut self) {
        let leader = self.try_leader();
        let mut followers: Vec<Child> = (0..self.members.len())
            .filter(|&i| Some(i) != leader)
            .filter_map(|i| self.members[i].child.take())
            .collect();
        let mut refs: Vec<&mut Child> = followers.iter_mut().collect();
        terminate_all(&mut refs);
        if let Some(i) = leader {
            if !followers.is_empty() {
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(3) && self.leads(i) {
                    thread::sleep(Duration::from_millis(100));
                }
            }
            self.stop_member(i);
        }
    }

    /// True when member `i` answers that it is the leader.
    fn leads(&self, i: usize) -> bool {
        let out = self
            .etcdctl_on(&[self.endpoint(i)])
            .args([
                "endpoint",
                "status",
                "-w",
                "json",
                "--dial-timeout=500ms",
                "--command-timeout=1s",
            ])
            .output()
            .expect("spawn etcdctl");
        let Ok(statuses) = serde_json::from_slice::<Value>(&out.stdout) else {
            return false;
        };
        let status = &statuses[0]["Status"];
        status["leader"].as_u64().is_some()
            && status["leader"].as_u64() == status["header"]["member_id"].as_u64()
    }

    /// Restarts every stopped member on its data directory and waits until all are
    /// healthy.
    pub fn start_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn_member(i, "existing");
            }
        }
        self.wait_healthy();
    }

    /// The index of the current leader, asked of the running members (`endpoint status`);
    /// waits up to 10 s for an election to settle, then panics.
    pub fn leader(&self) -> usize {
        let t0 = Instant::now();
        loop {
            if let Some(i) = self.try_leader() {
                return i;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no etcd leader within 10 s:\n{}",
                self.log_tails()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The leader's index when a running member reports itself as the leader now.
    pub fn try_leader(&self) -> Option<usize> {
        let endpoints: Vec<String> = self.running().iter().map(|&i| self.endpoint(i)).collect();
        if endpoints.is_empty() {
            return None;
        }
        let out = self
            .etcdctl_on(&endpoints)
            .args([
                "endpoint",
                "status",
                "-w",
                "json",
                "--dial-timeout=500ms",
                "--command-timeout=1s",
            ])
            .output()
            .expect("spawn etcdctl");
        // Members that do not answer are left out of the JSON (and fail the exit status).
        let statuses: Value = serde_json::from_slice(&out.stdout).ok()?;
        statuses.as_array()?.iter().find_map(|s| {
            let status = &s["Status"];
            let me = status["header"]["member_id"].as_u64()?;
            if status["leader"].as_u64()? != me {
                return None;
            }
            let endpoint = s["Endpoint"].as_str()?;
            let endpoint = endpoint.rsplit("://").next().unwrap_or(endpoint);
            (0..self.members.len()).find(|&i| self.endpoint(i) == endpoint)
        })
    }

    /// `etcdctl` (API 3, no proxy, the harness's credentials over TLS) against `endpoints`.
    fn etcdctl_on(&self, endpoints: &[String]) -> Command {
        let mut cmd = self.etcdctl_bare();
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| format!("{}://{e}", self.scheme))
            .collect();
        cmd.arg(format!("--endpoints={}", urls.join(",")));
        if let Some(pki) = &self.pki {
            cmd.arg("--cacert")
                .arg(&pki.ca)
                .arg("--cert")
                .arg(&pki.root_cert)
                .arg("--key")
                .arg(&pki.root_key);
        }
        cmd
    }

    /// `etcdctl` with `ETCDCTL_API=3`, no other `ETCDCTL_*` or proxy variable, and no
    /// endpoint or credential: for tests that pass their own (a client certificate, a
    /// user, the wrong scheme).
    pub fn etcdctl_bare(&self) -> Command {
        let mut cmd = Command::new("etcdctl");
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCDCTL_") {
                cmd.env_remove(name);
            }
        }
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        cmd.env("ETCDCTL_API", "3").stdin(Stdio::null());
        cmd
    }

    /// Runs `etcdctl ARGS` against every member (over TLS as `root`), to its end.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        self.etcdctl_on(&self.endpoints())
            .args(args)
            .output()
            .expect("spawn etcdctl")
    }

    /// Every key under `prefix` with its raw value bytes, in key order.
    pub fn raw_get_prefix(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let out = self.etcdctl(&["get", "--prefix", prefix, "-w", "json"]);
        assert!(
            out.status.success(),
            "etcdctl get --prefix {prefix}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reply: Value = serde_json::from_slice(&out.stdout).expect("etcdctl JSON");
        let b64 = base64::engine::general_purpose::STANDARD;
        let Some(kvs) = reply["kvs"].as_array() else {
            return Vec::new();
        };
        kvs.iter()
            .map(|kv| {
                let key = b64
                    .decode(kv["key"].as_str().expect("key"))
                    .expect("base64 key");
                let value = kv["value"]
                    .as_str()
                    .map(|v| b64.decode(v).expect("base64 value"))
                    .unwrap_or_default();
                (String::from_utf8_lossy(&key).into_owned(), value)
            })
            .collect()
    }

    /// Member `i`'s log (every start of it appends).
    pub fn member_log(&self, i: usize) -> String {
        fs::read(&self.members[i].log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for EtcdCluster {
    /// Kills every member outright (SIGKILL, then reaped): the data is thrown away with
    /// the directory, so a graceful stop ([`EtcdCluster::stop_all`], 1 to 2 s for three
    /// members) would only make every test slower.
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }
}
