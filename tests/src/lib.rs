//! The end-to-end harness: real `sluice` and `sluice-backend` processes on loopback ports,
//! started from the binaries cargo built next to the test executable, and killed on drop.
//!
//! `scripts/test.sh` builds the binaries before the tests run; running a test alone needs
//! `cargo build --workspace --bins` first.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod misbehaving;
pub mod postgres;
pub mod tls;

pub const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789";
pub const JWT_SECRET: &str = "e2e-jwt-secret-0123456789-0123456789";
pub const JWT_ISSUER: &str = "https://issuer.sluice.test";
pub const JWT_AUDIENCE: &str = "sluice-e2e";
/// The admin API's own JWT secret and audience (`[auth.admin_jwt]`), apart from the proxy's.
pub const ADMIN_JWT_SECRET: &str = "e2e-admin-jwt-secret-9876543210-9876543210";
pub const ADMIN_JWT_AUDIENCE: &str = "sluice-e2e-admin";
pub const SIM_MODEL: &str = "sim-chat";
pub const SIM_EMBED_MODEL: &str = "sim-embed";

/// A binary of this workspace, from cargo's target directory.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A loopback port nothing listens on, never one this process handed out before: the kernel
/// may give a just-released port straight back, and a gateway whose `listen` and
/// `admin_listen` came out equal refuses to start.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// The all-MiniLM-L6-v2 folder (`SLUICE_MINILM_DIR`, which scripts/test.sh sets from
/// scripts/fetch-weights.sh), if it is there.
pub fn minilm_dir() -> Option<PathBuf> {
    std::env::var_os("SLUICE_MINILM_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.join("config.json").is_file())
}

/// The SmolLM2-135M-Instruct GGUF file (`SLUICE_SMOLLM2_GGUF`, which scripts/test.sh sets
/// from scripts/fetch-weights.sh), if it is there.
pub fn smollm2_gguf() -> Option<PathBuf> {
    std::env::var_os("SLUICE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .filter(|file| file.is_file())
}

/// Model weights a test needs: `found` (from [`minilm_dir`] or [`smollm2_gguf`]), or `None`
/// with a note where a developer has not fetched them. Under CI (`CI=true`), where
/// scripts/test.sh fetches them, their absence fails the test instead.
pub fn required_weights(found: Option<PathBuf>, variable: &str, model: &str) -> Option<PathBuf> {
    if found.is_some() {
        return found;
    }
    let message = format!(
        "{variable} does not name the {model} weights: run \
         `export {variable}=$(scripts/fetch-weights.sh {model})` (scripts/test.sh does this)"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{message}");
    }
    eprintln!("skipping: {message}");
    None
}

/// The Python that runs the tests' scripts: SLUICE_TEST_PYTHON, else the repository's
/// .venv (scripts/test.sh fills it), else python3.
pub fn test_python() -> String {
    std::env::var("SLUICE_TEST_PYTHON").unwrap_or_else(|_| {
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
        if Path::new(venv).exists() {
            venv.to_owned()
        } else {
            "python3".to_owned()
        }
    })
}

/// A server written in Python (`tests/python/{script}`), on a loopback port of its own,
/// killed when dropped: a stand-in for what cannot run here (a hosted API, an identity
/// provider over HTTPS).
pub struct PythonServer {
    child: std::process::Child,
    pub port: u16,
}

impl PythonServer {
    /// Runs `script PORT args...` and waits until the port takes connections.
    pub async fn start<S: AsRef<std::ffi::OsStr>>(
        script: &str,
        args: &[S],
    ) -> Result<PythonServer> {
        let port = free_port();
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("python")
            .join(script);
        let child = Command::new(test_python())
            .arg(path)
            .arg(port.to_string())
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let mut server = PythonServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Some(status) = server.child.try_wait()? {
                bail!("{script} exited with {status} before it listened");
            }
            if Instant::now() > deadline {
                bail!("{script} did not listen on {port}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `tests/python/{script}` with [`test_python`] and `env`, off the async runtime, and
/// fails the test unless it exits 0 having printed "ALL OK" (the scripts' convention); the
/// failure shows its output and `log` (a process log worth seeing next to it).
pub async fn python_check(script: &str, env: &[(&str, &str)], log: impl FnOnce() -> String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(test_python())
            .arg(path)
            .envs(env)
            .output()
    })
    .await
    .expect("the python task")
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("ALL OK"),
        "{script} failed:\n{stdout}\n{stderr}\nlog:\n{}",
        log()
    );
}

pub fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A child process that is killed when dropped, with its output in a log file.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(mut command: Command, log: PathBuf) -> Result<Process> {
        let out = std::fs::File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawn {command:?}"))?;
        Ok(Process { child, log })
    }

    /// Sends SIGTERM (what Kubernetes and docker send), as `kill` does.
    fn terminate(&self) -> Result<()> {
        self.signal("TERM")
    }

    fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} failed: {status}");
        Ok(())
    }

    /// Waits up to `limit` for the process to exit; its exit status, or `None` if it did not.
    async fn wait_exit(&mut self, limit: Duration) -> Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        text[text.floor_char_boundary(start)..].to_owned()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_listening(port: u16, process: &mut Process) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Some(status) = process.child.try_wait()? {
            bail!(
                "process exited with {status} before port {port} listened:\n{}",
                process.log_tail()
            );
        }
        if Instant::now() > deadline {
            bail!("port {port} did not listen:\n{}", process.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn wait_healthy(url: &str, process: &mut Process) -> Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if let Some(status) = process.child.try_wait()? {
            bail!(
                "process exited with {status} before {url} answered:\n{}",
                process.log_tail()
            );
        }
        if Instant::now() > deadline {
            bail!("{url} did not become healthy:\n{}", process.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A simulated backend serving `sim-chat` and `sim-embed`.
pub struct Backend {
    pub url: String,
    pub port: u16,
    _process: Process,
    _dir: tempfile::TempDir,
}

impl Backend {
    pub async fn start() -> Result<Backend> {
        Backend::start_with(&[]).await
    }

    pub async fn start_with(extra_args: &[&str]) -> Result<Backend> {
        Backend::start_on(free_port(), extra_args).await
    }

    /// A backend on a given port (to restart one where it was).
    pub async fn start_on(port: u16, extra_args: &[&str]) -> Result<Backend> {
        Backend::start_at(std::net::Ipv4Addr::LOCALHOST, port, extra_args).await
    }

    /// A backend on another loopback address (127.0.0.2, ...) and a given port, so that two
    /// can share a port and a host name can be moved from one to the other.
    pub async fn start_at(
        ip: std::net::Ipv4Addr,
        port: u16,
        extra_args: &[&str],
    ) -> Result<Backend> {
        let mut args = vec![
            "--engine",
            "sim",
            "--model",
            SIM_MODEL,
            "--model",
            SIM_EMBED_MODEL,
        ];
        args.extend_from_slice(extra_args);
        Backend::spawn_at(ip, port, &args, &[]).await
    }

    /// A simulated backend with extra environment (e.g. `OTEL_*`).
    pub async fn start_with_env(env: &[(&str, &str)]) -> Result<Backend> {
        let args = [
            "--engine",
            "sim",
            "--model",
            SIM_MODEL,
            "--model",
            SIM_EMBED_MODEL,
        ];
        Backend::spawn(free_port(), &args, env).await
    }

    /// A backend with the native engine, serving what `args` (`--model`, `--device`) say.
    pub async fn start_native(args: &[&str]) -> Result<Backend> {
        let mut all = vec!["--engine", "native"];
        all.extend_from_slice(args);
        Backend::spawn(free_port(), &all, &[]).await
    }

    async fn spawn(port: u16, args: &[&str], env: &[(&str, &str)]) -> Result<Backend> {
        Backend::spawn_at(std::net::Ipv4Addr::LOCALHOST, port, args, env).await
    }

    async fn spawn_at(
        ip: std::net::Ipv4Addr,
        port: u16,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Backend> {
        let dir = tempfile::tempdir()?;
        let url = format!("http://{ip}:{port}");
        let mut command = Command::new(binary("sluice-backend"));
        command
            .args(["--listen", &format!("{ip}:{port}")])
            .args(args)
            .envs(env.iter().copied());
        let mut process = Process::spawn(command, dir.path().join("backend.log"))?;
        wait_healthy(&format!("{url}/health"), &mut process).await?;
        Ok(Backend {
            url,
            port,
            _process: process,
            _dir: dir,
        })
    }

    /// A counter from the backend's own `/metrics` (Prometheus text), summed over labels.
    pub async fn metric(&self, name: &str) -> Result<u64> {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await?
            .text()
            .await?;
        let mut total = 0;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let metric = series.split('{').next().unwrap_or(series);
            if metric == name {
                total += value
                    .trim()
                    .parse::<f64>()
                    .with_context(|| line.to_owned())? as u64;
            }
        }
        Ok(total)
    }

    /// Opens a sim gate; answers how many streams were waiting on it.
    pub async fn open_gate(&self, name: &str) -> Result<u64> {
        let v: Value = reqwest::Client::new()
            .post(format!("{}/sim/gates/{name}/open", self.url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        v["released"].as_u64().context("released count")
    }
}

/// Which store a gateway runs on.
#[derive(Clone, Debug)]
pub enum StoreKind {
    /// The embedded store, in this directory (a restart with the same one keeps its state).
    Embedded(PathBuf),
    /// Redis, under this key prefix (gateways with the same prefix share state).
    Redis(String),
    /// A Redis of the test's own at this URL, under this key prefix.
    RedisAt { url: String, prefix: String },
    /// A Redis of the test's own over TLS (a `rediss://` URL, one node or a cluster's),
    /// trusted through `ca` (`None`: the system's roots), shown `client` when given.
    RedisTlsAt {
        url: String,
        prefix: String,
        ca: Option<PathBuf>,
        client: Option<tls::Leaf>,
    },
}

impl StoreKind {
    pub fn fresh_redis() -> StoreKind {
        StoreKind::Redis(format!("sluice-e2e-{}", uuid::Uuid::new_v4().simple()))
    }
}

pub struct GatewayOptions {
    pub backends: Vec<String>,
    pub store: StoreKind,
    pub max_body_bytes: usize,
    /// Extra TOML appended to the generated config (e.g. `[[prices]]` tables).
    pub extra_config: String,
    /// Extra `[server]` settings (e.g. `max_in_flight = 2`).
    pub server_config: String,
    /// Extra environment for the process (e.g. `OTEL_*`).
    pub env: Vec<(String, String)>,
    /// Extra `[auth.jwt]` settings (e.g. `jwks_url = "..."`).
    pub jwt_config: String,
    /// A file the gateway sees as its `/etc/hosts` (bound over it in a mount namespace of
    /// its own, by `unshare`), so that a test can move a host name while it runs.
    pub hosts_file: Option<PathBuf>,
}

impl GatewayOptions {
    pub fn new(backend: &Backend, store: StoreKind) -> GatewayOptions {
        GatewayOptions::for_urls(vec![backend.url.clone()], store)
    }

    /// The same defaults, for backends a test runs itself, by URL.
    pub fn for_urls(backends: Vec<String>, store: StoreKind) -> GatewayOptions {
        GatewayOptions {
            backends,
            store,
            max_body_bytes: 1024 * 1024,
            extra_config: String::new(),
            server_config: String::new(),
            env: Vec::new(),
            jwt_config: String::new(),
            hosts_file: None,
        }
    }
}

/// A running `sluice serve`.
pub struct Gateway {
    pub url: String,
    pub admin_url: String,
    pub http: reqwest::Client,
    process: Process,
    _dir: tempfile::TempDir,
}

impl Gateway {
    pub async fn start(options: GatewayOptions) -> Result<Gateway> {
        // Another test process may take a port between free_port() and the gateway's bind;
        // fresh ports then are a new start, not a failed test.
        let mut attempts = 3;
        loop {
            match Gateway::start_on(&options, free_port(), free_port()).await {
                Err(e) if attempts > 1 && e.to_string().contains("Address already in use") => {
                    attempts -= 1;
                }
                started => return started,
            }
        }
    }

    async fn start_on(options: &GatewayOptions, port: u16, admin_port: u16) -> Result<Gateway> {
        let dir = tempfile::tempdir()?;
        let store = match &options.store {
            StoreKind::Embedded(data) => format!("data_dir = {:?}", data.display().to_string()),
            StoreKind::Redis(prefix) => {
                format!("redis_url = {:?}\nredis_prefix = {prefix:?}", redis_url())
            }
            StoreKind::RedisAt { url, prefix } => {
                format!("redis_url = {url:?}\nredis_prefix = {prefix:?}")
            }
            StoreKind::RedisTlsAt {
                url,
                prefix,
                ca,
                client,
            } => {
                let mut lines = format!("redis_url = {url:?}\nredis_prefix = {prefix:?}\n");
                if let Some(ca) = ca {
                    lines += &format!("redis_tls_ca_file = {:?}\n", ca.display().to_string());
                }
                if let Some(client) = client {
                    lines += &format!(
                        "redis_tls_cert_file = {:?}\nredis_tls_key_file = {:?}\n",
                        client.cert.display().to_string(),
                        client.key.display().to_string()
                    );
                }
                lines
            }
        };
        let backends: String = options
            .backends
            .iter()
            .enumerate()
            .map(|(i, url)| format!("[[backends]]\nname = \"backend-{i}\"\nurl = {url:?}\n\n"))
            .collect();
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
admin_token = "{ADMIN_TOKEN}"
max_body_bytes = {max_body}
threads = 2
grace_period_secs = 1
{store}
{server_extra}

[auth.jwt]
issuer = "{JWT_ISSUER}"
audience = "{JWT_AUDIENCE}"
hs256_secret = "{JWT_SECRET}"
{jwt_extra}

[auth.admin_jwt]
issuer = "{JWT_ISSUER}"
audience = "{ADMIN_JWT_AUDIENCE}"
hs256_secret = "{ADMIN_JWT_SECRET}"

{backends}
{extra}"#,
            max_body = options.max_body_bytes,
            server_extra = options.server_config,
            jwt_extra = options.jwt_config,
            extra = options.extra_config,
        );
        let config_path = dir.path().join("sluice.toml");
        std::fs::write(&config_path, config)?;
        let mut command = match &options.hosts_file {
            // unshare execs in place (no fork), as does the shell: the pid is the gateway's.
            Some(hosts) => {
                let mut command = Command::new("unshare");
                command
                    .args(["--mount", "sh", "-c"])
                    .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
                    .arg(hosts)
                    .arg(binary("sluice"));
                command
            }
            None => Command::new(binary("sluice")),
        };
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("SLUICE_LOG", "info")
            .env_remove("SLUICE_REDIS_URL")
            .env_remove("SLUICE_REDIS_TLS_CA")
            .env_remove("SLUICE_REDIS_TLS_CERT")
            .env_remove("SLUICE_REDIS_TLS_KEY")
            .env_remove("SLUICE_ADMIN_TOKEN")
            .env_remove("SLUICE_BACKENDS")
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .current_dir(dir.path());
        let mut process = Process::spawn(command, dir.path().join("gateway.log"))?;
        let mut admin_url = format!("http://127.0.0.1:{admin_port}");
        // A listener on TLS ([server.tls]) is for clients with the test's CA; this harness
        // speaks plain HTTP, so it waits for such a listener's port, and the test speaks to
        // it (curl, the Python client) itself.
        let url = if options.server_config.contains("[server.tls]") {
            if options.server_config.contains("admin = false") {
                wait_healthy(&format!("{admin_url}/health"), &mut process).await?;
            } else {
                wait_listening(admin_port, &mut process).await?;
                admin_url = format!("https://127.0.0.1:{admin_port}");
            }
            wait_listening(port, &mut process).await?;
            format!("https://127.0.0.1:{port}")
        } else {
            let url = format!("http://127.0.0.1:{port}");
            wait_healthy(&format!("{url}/health"), &mut process).await?;
            wait_healthy(&format!("{admin_url}/health"), &mut process).await?;
            url
        };
        Ok(Gateway {
            url,
            admin_url,
            http: reqwest::Client::new(),
            process,
            _dir: dir,
        })
    }

    /// A gateway in front of `backend` with the embedded store in a fresh directory.
    pub async fn embedded(backend: &Backend, data_dir: &Path) -> Result<Gateway> {
        Gateway::start(GatewayOptions::new(
            backend,
            StoreKind::Embedded(data_dir.to_owned()),
        ))
        .await
    }

    /// Sends SIGTERM: the gateway stops accepting, lets requests in flight finish, flushes
    /// its usage events and exits.
    pub fn terminate(&self) -> Result<()> {
        self.process.terminate()
    }

    /// SIGHUP: the gateway re-reads its TLS certificate.
    pub fn hang_up(&self) -> Result<()> {
        self.process.signal("HUP")
    }

    /// Waits up to `limit` for the gateway process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<Option<std::process::ExitStatus>> {
        self.process.wait_exit(limit).await
    }

    pub fn log(&self) -> String {
        self.process.log_tail()
    }

    /// The access log lines (`sluice::access`) in the gateway's log so far, as JSON.
    pub fn access_log(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["target"] == "sluice::access")
            .collect()
    }

    /// The admin listener's `/metrics` (Prometheus text), read as the admin.
    pub async fn admin_metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.admin_url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("the admin listener answers")
            .text()
            .await
            .expect("a metrics page")
    }

    /// The gateway process's resident memory now, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// The gateway's whole log so far, less lines containing `skip`.
    pub fn log_without(&self, skip: &str) -> String {
        std::fs::read_to_string(&self.process.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.contains(skip))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Whether the gateway's whole log so far contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(&self.process.log).is_ok_and(|text| text.contains(needle))
    }

    /// Waits (up to a minute) until the gateway's log shows `needle`: the log is written by a
    /// buffer flushed on its own schedule, so a line may land after the event it reports.
    pub async fn wait_for_log(&self, needle: &str) {
        for _ in 0..600 {
            if self.log_contains(needle) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the gateway never logged '{needle}'\n{}", self.log());
    }

    /// Creates an API key through the admin API: `(id, secret)`.
    pub async fn create_key(&self, tenant: &str, tier: &str) -> Result<(String, String)> {
        self.create_key_with(tenant, tier, json!({})).await
    }

    /// A proxy path's JSON answer to a `GET` with this bearer credential (`/v1/models`).
    pub async fn get_json(&self, path: &str, bearer: &str) -> Result<Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(bearer)
            .send()
            .await?;
        Ok(response.json().await?)
    }

    /// Creates an API key with limit overrides: `(id, secret)`.
    pub async fn create_key_with(
        &self,
        tenant: &str,
        tier: &str,
        limits: Value,
    ) -> Result<(String, String)> {
        let response = self
            .http
            .post(format!("{}/admin/v1/keys", self.admin_url))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"name": format!("{tenant}-key"), "tenant": tenant, "tier": tier, "limits": limits}))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if status != 201 {
            bail!("create key answered {status}: {body}");
        }
        Ok((
            body["id"].as_str().context("id")?.to_owned(),
            body["key"].as_str().context("key")?.to_owned(),
        ))
    }

    pub async fn revoke_key(&self, id: &str) -> Result<()> {
        self.http
            .delete(format!("{}/admin/v1/keys/{id}", self.admin_url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Calls the admin API as the admin, with an optional JSON body: the answer's status
    /// and JSON body (`Null` when it is not JSON).
    pub async fn admin_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.admin_as(ADMIN_TOKEN, method, path, body).await
    }

    /// [`Gateway::admin_json`] with another credential (a viewer's JWT, a wrong token).
    pub async fn admin_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.admin_url))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the admin API answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Calls the admin API as the admin: the answer's status and JSON body.
    pub async fn admin(&self, method: reqwest::Method, path: &str) -> Result<(u16, Value)> {
        let response = self
            .http
            .request(method, format!("{}{path}", self.admin_url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }

    /// The billing export as JSON Lines rows (`group_by`: `event`, or dimensions such as
    /// `key,model`), read as the admin.
    pub async fn billing_export(&self, group_by: &str) -> Result<Vec<Value>> {
        let response = self
            .http
            .get(format!("{}/admin/v1/billing/export", self.admin_url))
            .query(&[("group_by", group_by), ("format", "jsonl")])
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        if status != 200 {
            bail!("billing export answered {status}: {text}");
        }
        text.lines()
            .map(|line| serde_json::from_str(line).context("an export row is JSON"))
            .collect()
    }

    /// A key's live quota state (`GET /admin/v1/keys/{id}/quota`).
    pub async fn quota(&self, id: &str) -> Result<Value> {
        let (status, quota) = self
            .admin(reqwest::Method::GET, &format!("/admin/v1/keys/{id}/quota"))
            .await?;
        if status != 200 {
            bail!("quota of {id} answered {status}: {quota}");
        }
        Ok(quota)
    }

    /// POSTs a raw body to a proxy path with an optional bearer credential.
    pub async fn post_raw(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Result<reqwest::Response> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        Ok(request.send().await?)
    }
}

/// `[quotas]` with leases off: every admission is one store step, so a limit holds exactly.
pub const NO_LEASES: &str = "\n[quotas]\nlease_max_requests = 0\n";

/// `replicas` gateways in front of `backend`, sharing `store`, each with `extra_config`
/// appended to its configuration.
pub async fn fleet(
    backend: &Backend,
    replicas: usize,
    store: StoreKind,
    extra_config: &str,
) -> Vec<Gateway> {
    let mut gateways = Vec::new();
    for _ in 0..replicas {
        let options = GatewayOptions {
            extra_config: extra_config.to_owned(),
            ..GatewayOptions::new(backend, store.clone())
        };
        gateways.push(Gateway::start(options).await.expect("a replica starts"));
    }
    gateways
}

/// A JWT signed with the gateway's HS256 secret; `claims` are merged over good defaults.
pub fn jwt(claims: Value, secret: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let mut all = json!({
        "sub": "jwt-user", "tenant": "jwt-tenant", "tier": "pro",
        "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "exp": now + 300, "iat": now,
    });
    for (k, v) in claims.as_object().expect("claims object") {
        all[k] = v.clone();
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &all,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign jwt")
}

/// An admin JWT signed with the admin API's own secret; `claims` (a `role`, say) are merged
/// over good defaults.
pub fn admin_jwt(claims: Value) -> String {
    let mut all = json!({"aud": ADMIN_JWT_AUDIENCE, "tenant": null});
    for (k, v) in claims.as_object().expect("claims object") {
        all[k] = v.clone();
    }
    jwt(all, ADMIN_JWT_SECRET)
}

/// Reads an OpenAI error body and checks its shape: returns (type, code, message).
pub async fn openai_error(response: reqwest::Response) -> Result<(String, String, String)> {
    let body: Value = response.json().await.context("error body is JSON")?;
    let error = body.get("error").context("body has an 'error' object")?;
    let field = |name: &str| error[name].as_str().unwrap_or_default().to_owned();
    if field("message").is_empty() || field("type").is_empty() {
        bail!("error body lacks message or type: {body}");
    }
    Ok((field("type"), field("code"), field("message")))
}

/// How a test's Redis (a node, or every node of a cluster) speaks TLS, and only TLS.
#[derive(Clone, Debug)]
pub struct RedisTlsServer {
    /// The server's certificate: for a cluster, a [`tls::Role::Peer`] one, which the nodes
    /// also show each other on the cluster bus.
    pub cert: tls::Leaf,
    /// The CA that client (and peer) certificates must come from.
    pub ca: PathBuf,
    /// Whether clients must show a certificate from `ca` (`tls-auth-clients`).
    pub auth_clients: bool,
}

impl RedisTlsServer {
    /// A single node's TLS: a server certificate from `ca`, and client certificates from
    /// `ca` required when `auth_clients`.
    pub fn node_of(ca: &tls::Ca, auth_clients: bool) -> Result<RedisTlsServer> {
        Ok(RedisTlsServer {
            cert: ca.server_cert("redis")?,
            ca: ca.cert().to_owned(),
            auth_clients,
        })
    }

    /// redis-server's arguments for TLS on `port` alone (no plain port).
    fn server_args(&self, port: u16) -> Vec<String> {
        let path = |p: &Path| p.display().to_string();
        vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            path(&self.cert.cert),
            "--tls-key-file".into(),
            path(&self.cert.key),
            "--tls-ca-cert-file".into(),
            path(&self.ca),
            "--tls-auth-clients".into(),
            if self.auth_clients { "yes" } else { "no" }.into(),
        ]
    }

    /// redis-cli's arguments to reach such a server, showing the server's own certificate
    /// (a peer certificate is a client certificate too).
    fn cli_args(&self) -> Vec<String> {
        let path = |p: &Path| p.display().to_string();
        vec![
            "--tls".into(),
            "--cacert".into(),
            path(&self.ca),
            "--cert".into(),
            path(&self.cert.cert),
            "--key".into(),
            path(&self.cert.key),
        ]
    }
}

/// A Redis of the test's own, with its data on disk so that a restart keeps it.
pub struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    tls: Option<RedisTlsServer>,
}

impl OwnRedis {
    pub fn start() -> OwnRedis {
        OwnRedis::start_with(None)
    }

    /// A Redis that speaks only TLS, as `tls` says; its [`OwnRedis::url`] is `rediss://`.
    pub fn start_tls(tls: RedisTlsServer) -> OwnRedis {
        OwnRedis::start_with(Some(tls))
    }

    fn start_with(tls: Option<RedisTlsServer>) -> OwnRedis {
        let mut redis = OwnRedis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            tls,
        };
        redis.spawn();
        redis
    }

    /// Starts (or restarts) the server, with the data it had.
    pub fn spawn(&mut self) {
        let ports = match &self.tls {
            Some(tls) => tls.server_args(self.port),
            None => vec!["--port".to_owned(), self.port.to_string()],
        };
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1"])
            .args(ports)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/ensure-redis.sh installs it)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on {}", self.port);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three masters on loopback ports, made by the test and gone with it.
/// Each node appends every write to disk before answering, so the test can kill the whole
/// cluster and start it again with its data (and its cluster layout, in `nodes.conf`).
pub struct RedisCluster {
    nodes: Vec<OwnClusterNode>,
    tls: Option<RedisTlsServer>,
}

struct OwnClusterNode {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    tls: Option<RedisTlsServer>,
}

impl OwnClusterNode {
    fn spawn(&mut self) {
        let ports = match &self.tls {
            // The cluster bus speaks TLS too, on the TLS port + 10000.
            Some(tls) => {
                let mut args = tls.server_args(self.port);
                args.extend(["--tls-cluster".to_owned(), "yes".to_owned()]);
                args
            }
            None => vec!["--port".to_owned(), self.port.to_string()],
        };
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1"])
            .args(ports)
            .args([
                "--cluster-enabled",
                "yes",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--cluster-config-file")
            .arg(self.dir.path().join("nodes.conf"))
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnClusterNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port whose cluster bus port (port + 10000) is free too.
fn free_cluster_port() -> u16 {
    for _ in 0..200 {
        let port = 20_000 + (rand_u16() % 20_000);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port pair for a Redis Cluster node");
}

fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (nanos ^ (std::process::id() << 8)) as u16
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        RedisCluster::start_with(None)
    }

    /// A cluster whose nodes speak only TLS, to clients and to each other, as `tls` says
    /// (its certificate must be a [`tls::Role::Peer`] one); its [`RedisCluster::url`] lists
    /// `rediss://` nodes.
    pub fn start_tls(tls: RedisTlsServer) -> RedisCluster {
        RedisCluster::start_with(Some(tls))
    }

    fn start_with(tls: Option<RedisTlsServer>) -> RedisCluster {
        let cli_args = tls
            .as_ref()
            .map(RedisTlsServer::cli_args)
            .unwrap_or_default();
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let mut node = OwnClusterNode {
                port: free_cluster_port(),
                child: None,
                dir: tempfile::tempdir().unwrap(),
                tls: tls.clone(),
            };
            node.spawn();
            nodes.push(node);
        }
        for node in &nodes {
            wait_port(node.port);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .args(&cli_args)
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = RedisCluster { nodes, tls };
        cluster.wait_ready();
        cluster
    }

    /// redis-cli's arguments to reach the nodes (TLS, and a certificate, where they need it).
    fn cli_args(&self) -> Vec<String> {
        self.tls
            .as_ref()
            .map(RedisTlsServer::cli_args)
            .unwrap_or_default()
    }

    fn wait_ready(&self) {
        for node in &self.nodes {
            for attempt in 0.. {
                let out = Command::new("redis-cli")
                    .args(self.cli_args())
                    .args(["-p", &node.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli");
                if String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(attempt < 100, "the cluster did not become ready");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Kills every node (SIGKILL).
    pub fn kill(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }

    /// Starts every node again, with its data, and waits for the cluster to be whole.
    pub fn restart(&mut self) {
        for node in &mut self.nodes {
            node.spawn();
        }
        for node in &self.nodes {
            wait_port(node.port);
        }
        self.wait_ready();
    }

    /// Runs a command on every node; their answers.
    pub fn each_node(&self, args: &[&str]) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| {
                let out = Command::new("redis-cli")
                    .args(self.cli_args())
                    .args(["-p", &n.port.to_string()])
                    .args(args)
                    .output()
                    .expect("redis-cli");
                String::from_utf8_lossy(&out.stdout).trim().to_owned()
            })
            .collect()
    }

    /// The node list the gateway takes in `redis_url`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.nodes
            .iter()
            .map(|n| format!("{scheme}://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn wait_port(port: u16) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on {port}");
}

/// A NATS server with JetStream of the test's own (its store in a temporary directory, kept
/// across a restart).
pub struct OwnNats {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnNats {
    pub fn start() -> OwnNats {
        let mut nats = OwnNats {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        nats.spawn();
        nats
    }

    /// Starts (or restarts) the server, with the streams it had.
    pub fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (scripts/test.sh installs it)");
        self.child = Some(child);
        wait_port(self.port);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
    }
}
