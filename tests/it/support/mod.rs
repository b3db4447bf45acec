//! Test harness: a real moto server on 127.0.0.1 (started by `scripts/test`), the real binary, and
//! uniquely named AWS resources per test so that tests run in parallel.

pub mod docker;
pub mod proxy;
pub mod scan_check;
pub mod squid;
pub mod ssm_stub;

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_sqs::types::QueueAttributeName;
use offload_agent::aws::Clients;

pub const HEADER: &str = "Region,Country,ItemType,SalesChannel,OrderPriority,OrderDate,OrderId,ShipDate,UnitSold,UnitPrice,TotalRevenue,TotalCost,TotalProfit";

/// The emulator's URL; panics, naming the set-up command, when nothing listens there.
pub fn moto_endpoint() -> String {
    static CREDENTIALS: std::sync::Once = std::sync::Once::new();
    // The harness's own SDK clients use the default chain: give it the emulator's fake credentials
    // (set once, before any client exists).
    CREDENTIALS.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::remove_var("AWS_PROFILE");
    });
    let url = std::env::var("OFFLOAD_TEST_AWS_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:5123".to_string());
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    if TcpStream::connect_timeout(&addr.parse().expect("host:port"), Duration::from_secs(1))
        .is_err()
    {
        panic!(
            "no AWS emulator at {url}: run the tests with `scripts/test` (it installs moto[server] into .venv and \
             starts it), or start one with `.venv/bin/moto_server -H 127.0.0.1 -p 5123 &`"
        );
    }
    url
}

/// A moto server of a test's own (IAM authentication on, or stopped mid-test), on a free port;
/// killed when dropped.
pub struct PrivateMoto {
    pub endpoint: String,
    child: Option<Child>,
}

/// The repository's root (packages, vagrant/).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn venv_bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(".venv/bin")
        .join(name);
    if !p.exists() {
        panic!(
            "{} is missing: run the tests with `scripts/test` (it installs moto[server] into .venv)",
            p.display()
        );
    }
    p
}

/// Write an executable file (a stand-in program).
pub fn write_exec(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Run `tests/it/support/moto_helper.py ENDPOINT ARGS…` with the virtualenv's Python (boto3); its stdout.
pub fn moto_helper(endpoint: &str, args: &[&str]) -> String {
    let helper = repo().join("tests/it/support/moto_helper.py");
    let out = Command::new(venv_bin("python"))
        .arg(&helper)
        .arg(endpoint)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "moto_helper.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An ECS cluster in the emulator at `endpoint` with one container instance registered in it (on an
/// EC2 instance moto knows, which RegisterContainerInstance needs): the ECS client and the instance's
/// ARN, which the stand-in ECS agent reports as its own (`/var/lib/ecs/fake-arn`).
pub async fn cluster_with_instance(endpoint: &str, cluster: &str) -> (aws_sdk_ecs::Client, String) {
    let cfg = offload_agent::config::from_toml_str(
        &format!("[aws]\nregion='us-east-1'\nendpoint_url='{endpoint}'\n[queue]\nname='unused'\n[[pipeline]]\nname='p'\nbucket='b'\nprefix='in/'\nprocessor='orders-csv'\ntable='t'\noutput_prefix='out/'\n"),
        "harness.toml",
    )
    .unwrap();
    let clients =
        offload_agent::aws::clients_with(&cfg.aws, &cfg.network, Duration::from_secs(1), None)
            .await
            .unwrap();
    let ec2_instance = moto_helper(endpoint, &["ec2-instance"]);
    clients
        .ecs
        .create_cluster()
        .cluster_name(cluster)
        .send()
        .await
        .unwrap();
    let ci = clients
        .ecs
        .register_container_instance()
        .cluster(cluster)
        .instance_identity_document(format!(r#"{{"instanceId":"{ec2_instance}"}}"#))
        .send()
        .await
        .unwrap();
    let arn = ci
        .container_instance()
        .unwrap()
        .container_instance_arn()
        .unwrap()
        .to_string();
    (clients.ecs, arn)
}

impl PrivateMoto {
    /// Start one; `env` adds variables such as INITIAL_NO_AUTH_ACTION_COUNT.
    pub fn start(env: &[(&str, &str)]) -> PrivateMoto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::env::temp_dir().join(format!("moto-{port}.log"));
        let mut cmd = Command::new(venv_bin("moto_server"));
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let start = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "private moto did not start; see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        PrivateMoto {
            endpoint: format!("http://127.0.0.1:{port}"),
            child: Some(child),
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateMoto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A name no other test (or earlier run against the same moto) uses: lowercase, valid for buckets.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000;
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One orders row with a given id; `i` varies the values.
pub fn order_row(id: &str, i: usize) -> String {
    format!(
        "Sub-Saharan Africa,Chad,Office Supplies,Online,L,1/27/2011,{id},2/12/2011,{},651.21,{}.00,{}.25,{}.75",
        4484 + i,
        2920025 + i,
        2353920 + i,
        566104 + i
    )
}

/// A valid orders file with ids `first..first+n`.
/// The ids of `orders_csv(first, n)`.
pub fn order_ids(first: usize, n: usize) -> Vec<String> {
    (first..first + n)
        .map(|i| (100_000_000 + i).to_string())
        .collect()
}

pub fn orders_csv(first: usize, n: usize) -> String {
    let mut s = String::with_capacity(n * 110 + 200);
    s.push_str(HEADER);
    s.push('\n');
    for i in first..first + n {
        s.push_str(&order_row(&format!("{}", 100_000_000 + i), i));
        s.push('\n');
    }
    s
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One test's world: its own bucket, queues, table, spool and configuration file.
pub struct World {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub endpoint: String,
    pub bucket: String,
    pub queue: String,
    pub dlq: String,
    pub table: String,
    pub clients: Clients,
    pub creds: (String, String),
}

pub struct Options {
    /// Another emulator than the shared one (a test's private moto).
    pub endpoint: Option<String>,
    /// Access key id and secret for the harness and the agent (default: the emulator's "testing").
    pub creds: Option<(String, String)>,
    /// TOML appended to the configuration (extra sections); `{bucket}` stands for the world's bucket.
    pub extra: String,
    pub max_in_flight: usize,
    pub visibility_timeout: &'static str,
    pub shutdown_grace: &'static str,
    pub retry_base: &'static str,
    pub retry_max: &'static str,
    /// `queue.max_receive_count`: the fewest receives `provision` lets the redrive policy allow.
    pub max_receive_count: u32,
    /// Leave `queue.dead_letter_queue` out of the configuration (the queues are still provisioned).
    pub no_dlq: bool,
    /// `admin.listen` (default "127.0.0.1:0": any free port, so that parallel daemons never collide).
    pub admin_listen: String,
    /// The `[ecs_agent]` section's settings (default: `enabled = false`).
    pub ecs_agent: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            endpoint: None,
            creds: None,
            extra: String::new(),
            max_in_flight: 4,
            visibility_timeout: "30s",
            shutdown_grace: "10s",
            retry_base: "1s",
            retry_max: "15m",
            max_receive_count: offload_agent::config::DEFAULT_MAX_RECEIVE_COUNT,
            no_dlq: false,
            admin_listen: "127.0.0.1:0".into(),
            ecs_agent: "enabled = false".into(),
        }
    }
}

impl World {
    pub async fn new(name: &str) -> World {
        Self::with(name, Options::default()).await
    }

    /// Write the configuration and run `offload-agent provision` (the real command).
    pub async fn with(name: &str, o: Options) -> World {
        let endpoint = match &o.endpoint {
            Some(e) => {
                moto_endpoint(); // fake credentials for the default chain, set once
                e.clone()
            }
            None => moto_endpoint(),
        };
        let creds = o
            .creds
            .clone()
            .unwrap_or_else(|| ("testing".to_string(), "testing".to_string()));
        let id = unique(name);
        let dir = tempfile::tempdir().unwrap();
        let bucket = format!("b-{id}");
        let queue = format!("q-{id}");
        let dlq = format!("q-{id}-dlq");
        let table = format!("t-{id}");
        let config = dir.path().join("agent.toml");
        let spool = dir.path().join("spool");
        std::fs::write(
            &config,
            format!(
                r#"
[agent]
shutdown_grace = "{grace}"
log_level = "info,offload_agent=debug"

[aws]
region = "us-east-1"
endpoint_url = "{endpoint}"

[queue]
name = "{queue}"
dead_letter_queue = "{dlq}"
max_in_flight = {mif}
visibility_timeout = "{vis}"
wait_time = "1s"
retry_base = "{retry}"
retry_max = "{retry_max}"
max_receive_count = {max_receives}

[spool]
dir = "{spool}"

[ecs_agent]
{ecs_agent}

[admin]
listen = "{admin}"

[[pipeline]]
name = "orders"
bucket = "{bucket}"
prefix = "input/"
suffix = ".csv"
processor = "orders-csv"
table = "{table}"
output_prefix = "output/"
{extra}
"#,
                extra = o.extra.replace("{bucket}", &bucket),
                admin = o.admin_listen,
                ecs_agent = o.ecs_agent,
                grace = o.shutdown_grace,
                mif = o.max_in_flight,
                vis = o.visibility_timeout,
                retry = o.retry_base,
                retry_max = o.retry_max,
                max_receives = o.max_receive_count,
                spool = spool.display()
            ),
        )
        .unwrap();
        let cfg = offload_agent::config::load(&config, &Default::default()).unwrap();
        // The harness's clients sign with this world's keys, from a file of their own.
        let harness_creds = dir.path().join("harness-credentials");
        std::fs::write(
            &harness_creds,
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                creds.0, creds.1
            ),
        )
        .unwrap();
        let provider = offload_agent::credentials::RotatingCredentials::new(
            offload_agent::credentials::Source {
                identity_config: None,
                file: Some(harness_creds),
                profile: "default".into(),
            },
        );
        let clients = offload_agent::aws::clients_with(
            &cfg.aws,
            &cfg.network,
            Duration::from_secs(1),
            Some(provider),
        )
        .await
        .unwrap();
        let w = World {
            dir,
            config,
            endpoint,
            bucket,
            queue,
            dlq,
            table,
            clients,
            creds,
        };
        let out = w.agent(&["provision"]).output().unwrap();
        assert!(
            out.status.success(),
            "provision failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // S3 sends s3:TestEvent when a notification is configured; drain it so that tests count only
        // their own messages (one test checks the TestEvent on purpose).
        w.purge_queue().await;
        if o.no_dlq {
            // Provisioned with a dead-letter queue (and SQS's redrive to it); the agent is not told.
            let text = std::fs::read_to_string(&w.config).unwrap();
            let text = text.replace(&format!("dead_letter_queue = \"{}\"\n", w.dlq), "");
            std::fs::write(&w.config, text).unwrap();
        }
        w
    }

    /// The real binary with this world's configuration and fake credentials for the emulator.
    pub fn agent(&self, args: &[&str]) -> Command {
        self.agent_with(&self.config, args)
    }

    /// The same with another configuration file.
    pub fn agent_with(&self, config: &std::path::Path, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_offload-agent"));
        c.args(args)
            .arg("--config")
            .arg(config)
            .env("AWS_ACCESS_KEY_ID", &self.creds.0)
            .env("AWS_SECRET_ACCESS_KEY", &self.creds.1)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("RUST_LOG")
            // The machine's own egress settings (a CI runner's proxy, its AWS_CA_BUNDLE) are not the
            // test's: the egress tests set them explicitly.
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env_remove("AWS_CA_BUNDLE")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET");
        c
    }

    /// Start `offload-agent run`, its log going to a file in the world's directory.
    pub fn start(&self) -> Agent {
        self.start_cmd(self.agent(&["run"]))
    }

    /// Start another daemon on this world's queue and table, with a spool of its own (`spool-<n>`): one
    /// more host of a fleet.
    pub fn start_replica(&self, n: usize) -> Agent {
        let spool = self.dir.path().join("spool");
        let text = std::fs::read_to_string(&self.config).unwrap().replace(
            &format!("dir = \"{}\"", spool.display()),
            &format!("dir = \"{}-{n}\"", spool.display()),
        );
        let config = self.dir.path().join(format!("agent-{n}.toml"));
        std::fs::write(&config, text).unwrap();
        self.start_cmd(self.agent_with(&config, &["run"]))
    }

    /// The accounting every fault scenario ends with. `files` are the uploaded keys and the ids each
    /// holds. The table holds exactly those ids, each with the ConfirmationId its object version gives
    /// (so no retry changed one) and its source key; each output lists its file's ids in order; the
    /// main and dead-letter queues are empty.
    pub async fn account(&self, files: &[(String, Vec<String>)], output_prefix: &str) {
        use offload_agent::processors::table::Source;
        let mut expected = HashMap::new();
        for (key, ids) in files {
            let head = self
                .clients
                .s3
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .unwrap();
            let src = Source {
                bucket: self.bucket.clone(),
                key: key.clone(),
                etag: head.e_tag().unwrap().trim_matches('"').to_string(),
            };
            let name = key.trim_start_matches("input/");
            let out = self
                .get(&format!("{output_prefix}{name}"))
                .await
                .unwrap_or_else(|| panic!("no output for {key}"));
            let out = String::from_utf8(out).unwrap();
            let listed: Vec<&str> = out
                .lines()
                .skip(1)
                .map(|l| l.split(',').next().unwrap())
                .collect();
            assert_eq!(listed, *ids, "output of {key}");
            for id in ids {
                let cid = src.confirmation_id(id).hyphenated().to_string();
                assert!(
                    expected.insert(id.clone(), (key.clone(), cid)).is_none(),
                    "id {id} in two files"
                );
            }
        }
        let items = self.items().await;
        assert_eq!(items.len(), expected.len(), "items in the table");
        for item in &items {
            let id = s(item, "OrderId");
            let (key, cid) = expected
                .get(&id)
                .unwrap_or_else(|| panic!("unexpected item {id}"));
            assert_eq!(&s(item, "ConfirmationId"), cid, "ConfirmationId of {id}");
            assert_eq!(&s(item, "SourceKey"), key, "SourceKey of {id}");
        }
        assert_eq!(self.depth(&self.queue).await, (0, 0), "main queue");
        assert_eq!(self.depth(&self.dlq).await, (0, 0), "dead-letter queue");
    }

    /// Start a prepared `offload-agent run` command (its environment adjusted by the test).
    pub fn start_cmd(&self, mut cmd: Command) -> Agent {
        let log = self.dir.path().join(format!("agent-{}.log", unique("run")));
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd.stdout(Stdio::null()).stderr(file).spawn().unwrap();
        Agent {
            child: Some(child),
            log,
        }
    }

    pub async fn put(&self, key: &str, body: impl Into<Vec<u8>>) {
        self.clients
            .s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(body.into()))
            .send()
            .await
            .unwrap();
    }

    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let out = self
            .clients
            .s3
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .ok()?;
        Some(out.body.collect().await.unwrap().into_bytes().to_vec())
    }

    /// Poll until `key` exists (or panic after `timeout`, printing the agent's log).
    pub async fn wait_for(&self, key: &str, timeout: Duration, agent: &Agent) -> Vec<u8> {
        self.wait_for_with(key, timeout, || format!("agent log:\n{}", agent.log_text()))
            .await
    }

    /// The same for a daemon whose log is elsewhere (a booted host's journal, a VM's): `log` says
    /// what to show when the key never appears.
    pub async fn wait_for_with(
        &self,
        key: &str,
        timeout: Duration,
        log: impl Fn() -> String,
    ) -> Vec<u8> {
        let start = Instant::now();
        loop {
            if let Some(b) = self.get(key).await {
                return b;
            }
            if start.elapsed() > timeout {
                panic!(
                    "s3://{}/{key} did not appear within {timeout:?}; {}",
                    self.bucket,
                    log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn items(&self) -> Vec<HashMap<String, AttributeValue>> {
        let mut items = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .clients
                .dynamodb
                .scan()
                .table_name(&self.table)
                .set_exclusive_start_key(start)
                .send()
                .await
                .unwrap();
            items.extend(out.items().iter().cloned());
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        items
    }

    /// OrderId -> ConfirmationId of every item.
    pub async fn confirmations(&self) -> HashMap<String, String> {
        self.items()
            .await
            .into_iter()
            .map(|i| (s(&i, "OrderId"), s(&i, "ConfirmationId")))
            .collect()
    }

    /// Delete this world's main queue (as an operator's mistake would).
    pub async fn delete_queue(&self) {
        let url = self.queue_url(&self.queue).await;
        self.clients
            .sqs
            .delete_queue()
            .queue_url(&url)
            .send()
            .await
            .unwrap();
    }

    pub async fn queue_url(&self, name: &str) -> String {
        self.clients
            .sqs
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .unwrap()
            .queue_url()
            .unwrap()
            .to_string()
    }

    pub async fn send_raw(&self, body: &str) {
        let url = self.queue_url(&self.queue).await;
        self.clients
            .sqs
            .send_message()
            .queue_url(url)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }

    /// (visible, in flight) messages of a queue.
    pub async fn depth(&self, name: &str) -> (u64, u64) {
        let url = self.queue_url(name).await;
        let out = self
            .clients
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .unwrap();
        let a = out.attributes().unwrap();
        let n = |k: QueueAttributeName| a.get(&k).and_then(|v| v.parse().ok()).unwrap_or(0);
        (
            n(QueueAttributeName::ApproximateNumberOfMessages),
            n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        )
    }

    /// Wait until the main queue is empty (nothing visible, nothing in flight).
    pub async fn wait_queue_empty(&self, timeout: Duration, agent: &Agent) {
        let start = Instant::now();
        loop {
            if self.depth(&self.queue).await == (0, 0) {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "queue {} not empty after {timeout:?}: {:?}; agent log:\n{}",
                    self.queue,
                    self.depth(&self.queue).await,
                    agent.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Receive (and delete) every message of the dead-letter queue: (body, reason attribute).
    pub async fn drain_dlq(&self) -> Vec<(String, String)> {
        let url = self.queue_url(&self.dlq).await;
        let mut all = Vec::new();
        for _ in 0..5 {
            let out = self
                .clients
                .sqs
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(10)
                .message_attribute_names("All")
                .wait_time_seconds(1)
                .send()
                .await
                .unwrap();
            let msgs = out.messages.unwrap_or_default();
            if msgs.is_empty() && !all.is_empty() {
                break;
            }
            for m in msgs {
                let reason = m
                    .message_attributes()
                    .and_then(|a| a.get("offload-agent-reason"))
                    .and_then(|v| v.string_value())
                    .unwrap_or("")
                    .to_string();
                all.push((m.body().unwrap_or("").to_string(), reason));
                self.clients
                    .sqs
                    .delete_message()
                    .queue_url(&url)
                    .receipt_handle(m.receipt_handle().unwrap())
                    .send()
                    .await
                    .unwrap();
            }
        }
        all
    }

    pub async fn purge_queue(&self) {
        let url = self.queue_url(&self.queue).await;
        let _ = self.clients.sqs.purge_queue().queue_url(url).send().await;
    }
}

pub fn s(item: &HashMap<String, AttributeValue>, k: &str) -> String {
    match item.get(k) {
        Some(AttributeValue::S(v)) => v.clone(),
        Some(AttributeValue::N(v)) => v.clone(),
        other => panic!("attribute {k}: {other:?}"),
    }
}

/// A running `offload-agent run`; killed when dropped.
pub struct Agent {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Send SIGTERM and wait for the exit (panics after `timeout`). Returns the exit code and how long it
    /// took.
    pub fn terminate(&mut self, timeout: Duration) -> (i32, Duration) {
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        let mut child = self.child.take().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status.code().unwrap_or(-1), start.elapsed());
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                panic!(
                    "agent did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.log_text().contains(needle) {
            if start.elapsed() > timeout {
                panic!("agent log never said {needle:?}; log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A tmpfs mounted at a directory for the duration of a test (root only: the test
/// command runs as root).
pub struct SmallDisk(pub std::path::PathBuf);

impl SmallDisk {
    pub fn mount(dir: &std::path::Path, size: &str) -> SmallDisk {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the small-disk scenarios mount a tmpfs: run the tests as root with `scripts/test`"
        );
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs on {} failed", dir.display());
        SmallDisk(dir.to_path_buf())
    }

    pub fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount of {} failed", self.0.display());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The daemon's `/status` as JSON (an error while it is not listening yet).
pub async fn status(port: u16) -> Result<serde_json::Value, String> {
    let (code, body) = offload_agent::admin::get(
        format!("127.0.0.1:{port}").parse().unwrap(),
        "/status",
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| format!("GET /status: {e}"))?;
    assert_eq!(code, 200, "{body}");
    Ok(serde_json::from_str(&body).unwrap())
}

/// Wait until the daemon's `ecs_agent` status satisfies `ok`.
pub async fn wait_ecs(
    port: u16,
    what: &str,
    agent: &Agent,
    ok: impl Fn(&serde_json::Value) -> bool,
) {
    let start = Instant::now();
    loop {
        let s = status(port).await;
        if s.as_ref().is_ok_and(|s| ok(&s["ecs_agent"])) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "ECS agent never {what}: {:?}\nlog:\n{}",
            s.map(|s| s["ecs_agent"].clone()),
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Run `cmd` with `text` on its standard input; panic naming `what` unless it succeeds (a file
/// written into a VM or a booted host through `cat > path`).
pub fn feed(mut cmd: Command, text: &str, what: &str) {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
