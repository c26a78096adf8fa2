//! The files in `deploy/` against the code they deploy. No Docker, cluster or network: every
//! file is parsed and cross-checked with the app's own public API (the settings it reads, the
//! queue names it declares) and with the other deploy files (ports, names, labels).
//!
//! - compose: every process kind from the one image with the right subcommand, healthchecks
//!   on the ports the processes listen on, `depends_on` conditions, the simulator wiring.
//! - Kubernetes: the kustomization's resources, probes, limits, non-root pods, PDBs, the
//!   Service, the migrations Job, KEDA on the real inbound queue, a placeholder-only Secret.
//! - Dockerfile: multi-stage, non-root, the `fulfillment` binary as the entrypoint.
//! - Grafana: valid, one data source variable, only metrics the app exports.
//! - Every environment variable set anywhere is one the app reads and the README documents,
//!   and each process's environment is accepted by `Settings`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use marketplace_fulfillment::queue::Topology;
use marketplace_fulfillment::settings::{CONFIG_FILE_ENV, ENV_KEYS, Settings};
use serde::Deserialize;
use serde_json::Value;
use url::Url;
use uuid::Uuid;

/// Variables read outside the settings tree: the log filter.
const OTHER_ENV: &[&str] = &["RUST_LOG"];

/// Where the image installs the binary and the compose healthcheck helper.
const BINARY: &str = "/usr/local/bin/fulfillment";
const HTTP_PROBE: &str = "/usr/local/bin/http-probe";

/// Every metric the app exports (issue #7); the dashboard may use no other.
const COUNTERS_AND_GAUGES: &[&str] = &[
    "http_requests_total",
    "jwt_rejections_total",
    "fulfillment_events_total",
    "fulfillment_transitions_total",
    "marketplace_requests_total",
    "marketplace_retries_total",
    "fulfillment_dead_letters_total",
    "fulfillment_outbox_backlog",
    "fulfillment_oldest_unprocessed_event_age_seconds",
    "marketplace_token_refresh_failures_total",
    "marketplace_credential_expiry_seconds",
    "fulfillment_auto_accepted_total",
    "fulfillment_oldest_delivery_held_seconds",
    "fulfillment_deliveries_held_too_long",
];
const HISTOGRAMS: &[&str] = &[
    "http_request_duration_seconds",
    "publish_confirm_seconds",
    "jwks_fetch_seconds",
    "marketplace_request_duration_seconds",
    "fulfillment_webhook_to_ack_seconds",
];

// ---------------------------------------------------------------------------------------
// Reading the files

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML file as JSON, with `<<` merge keys applied (compose uses them).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .enumerate()
        .filter_map(|(i, document)| {
            let mut value = serde_norway::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{} document {}: {e}", path.display(), i + 1));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{} document {}: {e}", path.display(), i + 1));
            let json = serde_json::to_value(value)
                .unwrap_or_else(|e| panic!("{} document {} as JSON: {e}", path.display(), i + 1));
            (!json.is_null()).then_some(json)
        })
        .collect()
}

fn yaml(path: &Path) -> Value {
    let mut documents = yaml_documents(path);
    assert_eq!(
        documents.len(),
        1,
        "{}: expected one document",
        path.display()
    );
    documents.remove(0)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

/// A scalar (compose allows numbers and booleans in `environment`) as the string the
/// process sees.
fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected a list, got {value}"))
        .iter()
        .map(scalar)
        .collect()
}

/// The port of a `HOST:PORT` listen address.
fn port_of(address: &str) -> u16 {
    address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("{address:?} is not HOST:PORT"))
}

fn url(value: &str) -> Url {
    Url::parse(value).unwrap_or_else(|e| panic!("{value:?}: {e}"))
}

fn settings_from(env: &BTreeMap<String, String>, what: &str) -> Settings {
    let env: HashMap<String, String> = env.clone().into_iter().collect();
    Settings::from_sources(None, &env)
        .unwrap_or_else(|e| panic!("the app refuses the environment of {what}: {e}"))
}

// ---------------------------------------------------------------------------------------
// Every file

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let mut parsed = Vec::new();
    for path in files_under(&deploy()) {
        let documents = match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => yaml_documents(&path),
            Some("json") => vec![json(&path)],
            _ => continue,
        };
        assert!(!documents.is_empty(), "{} is empty", path.display());
        parsed.push(path.strip_prefix(deploy()).unwrap().to_path_buf());
    }
    for expected in [
        "compose.yaml",
        "kubernetes/kustomization.yaml",
        "grafana/fulfillment.json",
        "rabbitmq/definitions.json",
        "prometheus/prometheus.yml",
    ] {
        assert!(
            parsed.contains(&PathBuf::from(expected)),
            "deploy/{expected} was not found among {parsed:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// compose

struct Compose {
    services: BTreeMap<String, Value>,
}

impl Compose {
    fn load() -> Self {
        let file = yaml(&deploy().join("compose.yaml"));
        let services = file["services"]
            .as_object()
            .expect("compose.yaml has services")
            .iter()
            .map(|(name, service)| (name.clone(), service.clone()))
            .collect();
        Self { services }
    }

    fn service(&self, name: &str) -> &Value {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("compose.yaml has no service {name:?}"))
    }

    /// Services built from deploy/Dockerfile (the `fulfillment` image).
    fn app_services(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.services.iter().filter(|(_, s)| {
            s["image"]
                .as_str()
                .is_some_and(|image| image_name(image) == "fulfillment")
        })
    }

    /// The worker services: one replicated `worker`, or `worker-1`, `worker-2`, ….
    fn workers(&self) -> Vec<(&String, &Value)> {
        self.services
            .iter()
            .filter(|(name, _)| *name == "worker" || name.starts_with("worker-"))
            .collect()
    }

    fn environment(&self, name: &str) -> BTreeMap<String, String> {
        let service = self.service(name);
        match &service["environment"] {
            Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), scalar(v))).collect(),
            Value::Array(list) => list
                .iter()
                .map(|entry| {
                    let entry = scalar(entry);
                    let (k, v) = entry.split_once('=').unwrap_or((&entry, ""));
                    (k.to_string(), v.to_string())
                })
                .collect(),
            Value::Null => BTreeMap::new(),
            other => panic!("{name}: environment is {other}"),
        }
    }

    fn command(&self, name: &str) -> Vec<String> {
        match &self.service(name)["command"] {
            Value::Array(_) => strings(&self.service(name)["command"]),
            Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
            other => panic!("{name}: command is {other}, expected the subcommand"),
        }
    }

    /// The value following `flag` in a service's command.
    fn flag(&self, name: &str, flag: &str) -> String {
        let command = self.command(name);
        let at = command
            .iter()
            .position(|arg| arg == flag)
            .unwrap_or_else(|| panic!("{name}: no {flag} in {command:?}"));
        command
            .get(at + 1)
            .cloned()
            .unwrap_or_else(|| panic!("{name}: {flag} has no value"))
    }
}

/// `registry/name:tag` → `name`.
fn image_name(image: &str) -> &str {
    let without_tag = match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => name,
        _ => image,
    };
    without_tag.rsplit('/').next().unwrap_or(without_tag)
}

#[test]
fn compose_runs_every_process_kind_from_the_one_image() {
    let compose = Compose::load();
    for name in ["postgres", "rabbitmq", "migrate", "ingress", "simulator"] {
        compose.service(name);
    }
    let workers = compose.workers();
    let replicas: u64 = workers
        .iter()
        .map(|(_, s)| {
            s.pointer("/deploy/replicas")
                .and_then(Value::as_u64)
                .unwrap_or(1)
        })
        .sum();
    assert!(replicas >= 2, "two workers expected, found {replicas}");

    let expected = |name: &str| match name {
        "migrate" => "migrate",
        "ingress" => "serve",
        "simulator" => "simulate",
        "demo" => "demo",
        n if n == "worker" || n.starts_with("worker-") => "work",
        other => panic!("app service {other:?} has no expected subcommand here"),
    };
    let apps: Vec<&String> = compose.app_services().map(|(name, _)| name).collect();
    for name in ["migrate", "ingress", "simulator"]
        .into_iter()
        .chain(workers.iter().map(|(n, _)| n.as_str()))
    {
        assert!(
            apps.iter().any(|a| *a == name),
            "{name} does not run the fulfillment image"
        );
    }
    let compose_dir = deploy();
    for (name, service) in compose.app_services() {
        assert_eq!(
            compose.command(name).first().map(String::as_str),
            Some(expected(name)),
            "{name} runs the wrong subcommand"
        );
        let context = compose_dir.join(str_at(service, "/build/context"));
        assert_eq!(
            context.canonicalize().unwrap(),
            root().canonicalize().unwrap(),
            "{name}: the build context must be the repository root"
        );
        let dockerfile = context.join(str_at(service, "/build/dockerfile"));
        assert_eq!(
            dockerfile.canonicalize().unwrap(),
            deploy().join("Dockerfile").canonicalize().unwrap(),
            "{name}: build with deploy/Dockerfile"
        );
    }
}

#[test]
fn compose_services_wait_for_what_they_need() {
    let compose = Compose::load();
    let one_shot = ["migrate", "demo"];
    for (name, service) in &compose.services {
        if one_shot.contains(&name.as_str()) {
            assert_eq!(
                scalar(&service["restart"]),
                "no",
                "{name} runs once; restarting it would loop"
            );
            continue;
        }
        let test = &service["healthcheck"]["test"];
        assert!(
            test.as_array().is_some_and(|t| t.len() >= 2),
            "{name} has no healthcheck"
        );
        assert_ne!(strings(test)[0], "NONE", "{name} disables its healthcheck");
    }
    for (name, service) in &compose.services {
        let Some(depends_on) = service["depends_on"].as_object() else {
            continue;
        };
        for (dependency, condition) in depends_on {
            let target = compose.service(dependency);
            let condition = str_at(condition, "/condition");
            match condition {
                "service_healthy" => assert!(
                    target["healthcheck"].is_object(),
                    "{name} waits for {dependency} to be healthy, which has no healthcheck"
                ),
                "service_completed_successfully" => assert!(
                    one_shot.contains(&dependency.as_str()),
                    "{name} waits for {dependency} to exit, which keeps running"
                ),
                "service_started" => {}
                other => panic!("{name}: unknown condition {other} for {dependency}"),
            }
        }
    }
    let condition = |service: &str, dependency: &str| {
        compose
            .service(service)
            .pointer(&format!("/depends_on/{dependency}/condition"))
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{service} does not wait for {dependency}"))
            .to_string()
    };
    assert_eq!(condition("migrate", "postgres"), "service_healthy");
    let long_running = std::iter::once("ingress".to_string())
        .chain(compose.workers().into_iter().map(|(n, _)| n.clone()));
    for name in long_running {
        assert_eq!(
            condition(&name, "migrate"),
            "service_completed_successfully",
            "{name} must start on the migrated schema"
        );
        assert_eq!(condition(&name, "postgres"), "service_healthy");
        assert_eq!(condition(&name, "rabbitmq"), "service_healthy");
    }
    assert!(
        strings(&compose.service("postgres")["healthcheck"]["test"]).contains(&"pg_isready".into())
    );
    assert!(
        strings(&compose.service("rabbitmq")["healthcheck"]["test"])
            .contains(&"rabbitmq-diagnostics".into())
    );
}

#[test]
fn compose_healthchecks_probe_the_port_each_process_listens_on() {
    let compose = Compose::load();
    let dockerfile = Dockerfile::load();
    assert!(
        dockerfile.final_stage().iter().any(|(instruction, args)| {
            instruction == "COPY"
                && args.contains("deploy/docker/http-probe")
                && args.ends_with(HTTP_PROBE)
        }),
        "the image must carry {HTTP_PROBE}, which the compose healthchecks run"
    );
    let probe = root().join("deploy/docker/http-probe");
    assert!(probe.is_file(), "{} is missing", probe.display());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&probe).unwrap().permissions().mode();
        assert!(mode & 0o111 != 0, "{} is not executable", probe.display());
    }

    let mut expectations = vec![(
        "ingress".to_string(),
        port_of(&compose.environment("ingress")["LISTEN_ADDR"]),
        "/healthz",
    )];
    for (name, _) in compose.workers() {
        let address = compose
            .environment(name)
            .get("WORKER_METRICS_ADDR")
            .cloned();
        let address = address.unwrap_or_else(|| panic!("{name}: WORKER_METRICS_ADDR not set"));
        expectations.push((name.clone(), port_of(&address), "/healthz"));
    }
    expectations.push((
        "simulator".into(),
        port_of(&compose.flag("simulator", "--listen")),
        "/simulator/health",
    ));
    for (name, port, path) in expectations {
        let test = strings(&compose.service(&name)["healthcheck"]["test"]);
        assert_eq!(
            test,
            ["CMD", HTTP_PROBE, &port.to_string(), path],
            "{name}: the healthcheck must probe {path} on the port it listens on"
        );
    }
}

#[test]
fn compose_wires_the_app_to_the_simulator_and_the_simulator_to_the_ingress() {
    let compose = Compose::load();
    let simulator_port = port_of(&compose.flag("simulator", "--listen"));
    let ingress_port = port_of(&compose.environment("ingress")["LISTEN_ADDR"]);
    let rabbitmq = compose.environment("rabbitmq");
    let postgres = compose.environment("postgres");

    for (name, _) in compose.app_services() {
        let env = compose.environment(name);
        let settings = settings_from(&env, &format!("compose service {name}"));
        if name == "demo" {
            continue; // starts its own simulator, ingress and worker
        }
        for (what, url, path) in [
            ("MARKETPLACE_API_URL", &settings.marketplace.api_url, "/api"),
            (
                "ENTRA_AUTHORITY_URL",
                &settings.marketplace.entra_authority_url,
                "/",
            ),
        ] {
            assert_eq!(url.host_str(), Some("simulator"), "{name}: {what}");
            assert_eq!(url.port(), Some(simulator_port), "{name}: {what}");
            assert_eq!(url.path(), path, "{name}: {what}");
        }
        let database = settings.database.url.url();
        assert_eq!(
            database.host_str(),
            Some("postgres"),
            "{name}: DATABASE_URL"
        );
        assert_eq!(
            database.password(),
            postgres.get("POSTGRES_PASSWORD").map(String::as_str),
            "{name}: DATABASE_URL password"
        );
        let amqp = settings.amqp.url.url();
        assert_eq!(amqp.host_str(), Some("rabbitmq"), "{name}: AMQP_URL");
        assert_eq!(
            Some(amqp.username()),
            rabbitmq.get("RABBITMQ_DEFAULT_USER").map(String::as_str),
            "{name}: AMQP_URL user"
        );
        assert_eq!(
            amqp.password(),
            rabbitmq.get("RABBITMQ_DEFAULT_PASS").map(String::as_str),
            "{name}: AMQP_URL password"
        );
    }

    // One publisher identity on both sides, or the simulator refuses the app's tokens and
    // the ingress refuses the simulator's webhooks.
    let identity = |name: &str| {
        let env = compose.environment(name);
        [
            "MARKETPLACE_TENANT_ID",
            "MARKETPLACE_CLIENT_ID",
            "MARKETPLACE_CLIENT_SECRET",
        ]
        .map(|var| env.get(var).cloned())
    };
    for (name, _) in compose.app_services() {
        assert_eq!(identity(name), identity("simulator"), "{name}: identity");
    }

    let webhook = url(&compose.flag("simulator", "--webhook-url"));
    assert_eq!(webhook.host_str(), Some("ingress"));
    assert_eq!(webhook.port(), Some(ingress_port));
    assert_eq!(webhook.path(), "/webhook");
    let landing = url(&compose.flag("simulator", "--landing-url"));
    assert_eq!(landing.path(), "/landing");
    let published: Vec<String> = strings(&compose.service("ingress")["ports"]);
    assert!(
        published
            .iter()
            .any(|p| p.ends_with(&format!(":{}:{ingress_port}", landing.port().unwrap()))),
        "the landing URL {landing} must reach the ingress as published: {published:?}"
    );
    // Listening on 0.0.0.0 the simulator calls itself 127.0.0.1, which a v2 token's issuer
    // would carry; a v1 issuer names no host, so the ingress accepts it.
    assert_eq!(compose.flag("simulator", "--issuer"), "v1");
}

#[test]
fn prometheus_scrapes_the_ports_the_processes_listen_on() {
    let compose = Compose::load();
    let config = yaml(&deploy().join("prometheus/prometheus.yml"));
    let text = config.to_string();
    let ingress_port = port_of(&compose.environment("ingress")["LISTEN_ADDR"]);
    assert!(
        text.contains(&format!("\"ingress:{ingress_port}\"")),
        "prometheus.yml must scrape ingress:{ingress_port}"
    );
    for (name, _) in compose.workers() {
        let port = port_of(&compose.environment(name)["WORKER_METRICS_ADDR"]);
        assert!(
            text.contains(&format!("\"port\":{port}"))
                || text.contains(&format!("\"{name}:{port}\"")),
            "prometheus.yml must scrape {name} on {port}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Kubernetes

struct Kubernetes {
    resources: Vec<Value>,
    kustomization: Value,
}

impl Kubernetes {
    fn load() -> Self {
        let dir = deploy().join("kubernetes");
        let kustomization = yaml(&dir.join("kustomization.yaml"));
        let listed = strings(&kustomization["resources"]);
        let mut resources = Vec::new();
        for file in &listed {
            let path = dir.join(file);
            assert!(
                path.is_file(),
                "kustomization.yaml lists {file}, which does not exist"
            );
            let documents = yaml_documents(&path);
            assert!(!documents.is_empty(), "{file} is empty");
            for document in documents {
                for field in ["/apiVersion", "/kind", "/metadata/name"] {
                    str_at(&document, field);
                }
                resources.push(document);
            }
        }
        for path in files_under(&dir) {
            let file = path
                .strip_prefix(&dir)
                .unwrap()
                .to_string_lossy()
                .to_string();
            if file != "kustomization.yaml" && (file.ends_with(".yaml") || file.ends_with(".yml")) {
                assert!(
                    listed.contains(&file),
                    "{file} is not in kustomization.yaml's resources"
                );
            }
        }
        Self {
            resources,
            kustomization,
        }
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.resources
            .iter()
            .filter(|r| r["kind"] == kind)
            .collect()
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.of_kind(kind)
            .into_iter()
            .find(|r| r["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in the kustomization"))
    }

    /// The Deployment whose container runs `fulfillment {subcommand}`.
    fn deployment_running(&self, subcommand: &str) -> &Value {
        let found: Vec<&Value> = self
            .of_kind("Deployment")
            .into_iter()
            .filter(|d| {
                containers(d)
                    .iter()
                    .any(|c| subcommand_of(c).as_deref() == Some(subcommand))
            })
            .collect();
        assert_eq!(found.len(), 1, "one Deployment should run `{subcommand}`");
        found[0]
    }

    /// The environment a container starts with: its `envFrom` ConfigMaps and Secrets, then
    /// its `env` values.
    fn environment(&self, container: &Value) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for source in container["envFrom"].as_array().into_iter().flatten() {
            let (kind, name, field) = if let Some(name) = source.pointer("/configMapRef/name") {
                ("ConfigMap", name, "data")
            } else if let Some(name) = source.pointer("/secretRef/name") {
                ("Secret", name, "stringData")
            } else {
                panic!("unsupported envFrom {source}")
            };
            let resource = self.named(kind, name.as_str().unwrap());
            for (k, v) in resource[field].as_object().into_iter().flatten() {
                env.insert(k.clone(), scalar(v));
            }
        }
        for var in container["env"].as_array().into_iter().flatten() {
            env.insert(str_at(var, "/name").to_string(), scalar(&var["value"]));
        }
        env
    }

    /// Every container of every workload.
    fn workload_containers(&self) -> Vec<(String, &Value)> {
        self.resources
            .iter()
            .filter(|r| matches!(r["kind"].as_str(), Some("Deployment" | "Job")))
            .flat_map(|r| {
                let name = format!("{} {}", str_at(r, "/kind"), str_at(r, "/metadata/name"));
                containers(r).into_iter().map(move |c| (name.clone(), c))
            })
            .collect()
    }
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn containers(workload: &Value) -> Vec<&Value> {
    pod_spec(workload)["containers"]
        .as_array()
        .map(|c| c.iter().collect())
        .unwrap_or_default()
}

/// The subcommand a container runs: the image's ENTRYPOINT is the binary, so it is the first
/// of `args` (or of `command` after the binary).
fn subcommand_of(container: &Value) -> Option<String> {
    if let Some(command) = container["command"].as_array() {
        let command: Vec<String> = command.iter().map(scalar).collect();
        assert_eq!(command.first().map(String::as_str), Some(BINARY));
        return command.get(1).cloned();
    }
    container["args"]
        .as_array()
        .and_then(|args| args.first())
        .map(scalar)
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().expect("matchLabels");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The container port a probe or Service names, by name or number.
fn container_port(container: &Value, port: &Value) -> u16 {
    let ports = container["ports"]
        .as_array()
        .expect("the container declares its ports");
    let found = ports.iter().find(|p| match port {
        Value::String(name) => p["name"] == name.as_str(),
        number => p["containerPort"] == *number,
    });
    let found = found.unwrap_or_else(|| panic!("port {port} is not a container port"));
    found["containerPort"].as_u64().unwrap() as u16
}

#[test]
fn kubernetes_deployments_probe_health_and_readiness_on_their_listen_ports() {
    let k8s = Kubernetes::load();
    for (subcommand, listen_var) in [("serve", "LISTEN_ADDR"), ("work", "WORKER_METRICS_ADDR")] {
        let deployment = k8s.deployment_running(subcommand);
        let name = str_at(deployment, "/metadata/name");
        for container in containers(deployment) {
            let env = k8s.environment(container);
            let listen = env
                .get(listen_var)
                .unwrap_or_else(|| panic!("{name}: {listen_var} is not set"));
            assert!(
                listen.starts_with("0.0.0.0:") || listen.starts_with("[::]:"),
                "{name}: {listen_var}={listen} is unreachable for the kubelet"
            );
            for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
                let get = &container[probe]["httpGet"];
                assert_eq!(
                    get["path"].as_str(),
                    Some(path),
                    "{name}: {probe} must GET {path}"
                );
                assert_eq!(
                    container_port(container, &get["port"]),
                    port_of(listen),
                    "{name}: {probe} must probe the port of {listen_var}"
                );
            }
        }
    }
}

#[test]
fn kubernetes_workloads_run_the_image_as_non_root_within_limits() {
    let k8s = Kubernetes::load();
    let images = k8s.kustomization["images"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        images.iter().any(|i| i["name"] == "fulfillment"),
        "kustomization.yaml sets the fulfillment image"
    );
    let mut subcommands = BTreeSet::new();
    for workload in k8s
        .resources
        .iter()
        .filter(|r| matches!(r["kind"].as_str(), Some("Deployment" | "Job")))
    {
        let name = str_at(workload, "/metadata/name");
        let pod = pod_spec(workload);
        for container in containers(workload) {
            assert_eq!(
                image_name(str_at(container, "/image")),
                "fulfillment",
                "{name}: run the fulfillment image"
            );
            subcommands.insert(subcommand_of(container).expect("a subcommand"));
            let non_root = |ctx: &Value| ctx["runAsNonRoot"].as_bool();
            assert!(
                non_root(&container["securityContext"])
                    .or(non_root(&pod["securityContext"]))
                    .unwrap_or(false),
                "{name}: runAsNonRoot"
            );
            for ctx in [&pod["securityContext"], &container["securityContext"]] {
                if let Some(user) = ctx["runAsUser"].as_u64() {
                    assert_ne!(user, 0, "{name}: runAsUser 0 is root");
                }
            }
            assert_eq!(
                container["securityContext"]["allowPrivilegeEscalation"], false,
                "{name}: allowPrivilegeEscalation"
            );
            for bound in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    assert!(
                        container["resources"][bound][resource].is_string(),
                        "{name}: resources.{bound}.{resource}"
                    );
                }
            }
        }
    }
    assert_eq!(
        subcommands,
        BTreeSet::from(["migrate".into(), "serve".into(), "work".into()])
    );
}

#[test]
fn pod_disruption_budgets_cover_every_deployment() {
    let k8s = Kubernetes::load();
    let deployments = k8s.of_kind("Deployment");
    let budgets = k8s.of_kind("PodDisruptionBudget");
    for budget in &budgets {
        let selector = &budget["spec"]["selector"]["matchLabels"];
        assert!(
            deployments
                .iter()
                .any(|d| labels_match(selector, &d["spec"]["template"]["metadata"]["labels"])),
            "PDB {} selects no Deployment's pods",
            budget["metadata"]["name"]
        );
    }
    for deployment in deployments {
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        assert!(
            labels_match(&deployment["spec"]["selector"]["matchLabels"], labels),
            "{}: selector does not match the pod labels",
            deployment["metadata"]["name"]
        );
        assert!(
            budgets
                .iter()
                .any(|b| labels_match(&b["spec"]["selector"]["matchLabels"], labels)),
            "Deployment {} has no PodDisruptionBudget",
            deployment["metadata"]["name"]
        );
    }
}

#[test]
fn the_service_routes_to_the_ingress_pods() {
    let k8s = Kubernetes::load();
    let ingress = k8s.deployment_running("serve");
    let container = containers(ingress)[0];
    let services = k8s.of_kind("Service");
    let service = services
        .iter()
        .find(|s| {
            labels_match(
                &s["spec"]["selector"],
                &ingress["spec"]["template"]["metadata"]["labels"],
            )
        })
        .expect("a Service selects the ingress pods");
    let listen = port_of(&k8s.environment(container)["LISTEN_ADDR"]);
    for port in service["spec"]["ports"].as_array().unwrap() {
        assert_eq!(container_port(container, &port["targetPort"]), listen);
    }
}

#[test]
fn the_migrations_job_runs_migrate_once() {
    let k8s = Kubernetes::load();
    let jobs = k8s.of_kind("Job");
    let job = jobs
        .iter()
        .find(|j| {
            containers(j)
                .iter()
                .any(|c| subcommand_of(c).as_deref() == Some("migrate"))
        })
        .expect("a Job runs `fulfillment migrate`");
    let restart = str_at(pod_spec(job), "/restartPolicy");
    assert!(matches!(restart, "OnFailure" | "Never"), "{restart}");
}

#[test]
fn keda_scales_the_worker_deployment_on_the_real_inbound_queue() {
    let k8s = Kubernetes::load();
    let worker = k8s.deployment_running("work");
    let scaled = k8s.of_kind("ScaledObject");
    assert_eq!(scaled.len(), 1);
    let scaled = scaled[0];
    assert_eq!(str_at(scaled, "/apiVersion"), "keda.sh/v1alpha1");
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"], worker["metadata"]["name"],
        "the ScaledObject must target the worker Deployment"
    );
    assert!(
        worker["spec"]["replicas"].is_null(),
        "KEDA owns the worker count; `replicas` would fight it on every apply"
    );
    let min = scaled["spec"]["minReplicaCount"].as_u64().unwrap_or(0);
    assert!(
        min >= 1,
        "never scale the workers to zero: the outbox needs them"
    );

    // The queue the workers consume, named by the topology code for the prefix the workers
    // are configured with.
    let env = k8s.environment(containers(worker)[0]);
    let settings = settings_from(&env, "the worker Deployment");
    let inbound = Topology::new(&settings.amqp.prefix).inbound_queue();

    let triggers = scaled["spec"]["triggers"].as_array().unwrap();
    assert_eq!(triggers.len(), 1);
    let trigger = &triggers[0];
    assert_eq!(trigger["type"], "rabbitmq");
    assert_eq!(str_at(trigger, "/metadata/queueName"), inbound);
    assert_eq!(str_at(trigger, "/metadata/mode"), "QueueLength");
    assert!(str_at(trigger, "/metadata/value").parse::<u32>().unwrap() > 0);

    let auth = k8s.named(
        "TriggerAuthentication",
        str_at(trigger, "/authenticationRef/name"),
    );
    let refs = auth["spec"]["secretTargetRef"].as_array().unwrap();
    assert!(refs.iter().any(|r| r["parameter"] == "host"));
    for reference in refs {
        let secret = k8s.named("Secret", str_at(reference, "/name"));
        let key = str_at(reference, "/key");
        assert!(
            secret["stringData"].get(key).is_some(),
            "the TriggerAuthentication reads {key}, which the Secret lacks"
        );
        if reference["parameter"] == "host" {
            let broker = url(str_at(&secret["stringData"], &format!("/{key}")));
            assert!(matches!(broker.scheme(), "amqp" | "amqps"));
            assert_eq!(str_at(trigger, "/metadata/protocol"), "amqp");
        }
    }
}

#[test]
fn kubernetes_environments_are_accepted_by_the_app() {
    let k8s = Kubernetes::load();
    for (workload, container) in k8s.workload_containers() {
        settings_from(&k8s.environment(container), &workload);
    }
}

/// Issue #20: the Fulfillment API token comes from AKS workload identity, not a client
/// secret: the service account names the app, the pods ask the webhook for the federated
/// token, and the app is told to use it.
#[test]
fn kubernetes_uses_workload_identity_instead_of_a_client_secret() {
    let k8s = Kubernetes::load();
    for subcommand in ["serve", "work"] {
        let deployment = k8s.deployment_running(subcommand);
        let pod = pod_spec(deployment);
        let account = str_at(pod, "/serviceAccountName");
        let service_account = k8s.named("ServiceAccount", account);
        let client_id = str_at(
            service_account,
            "/metadata/annotations/azure.workload.identity~1client-id",
        );
        Uuid::parse_str(client_id).expect("the client-id annotation is a GUID");
        assert_eq!(
            deployment["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"],
            "true",
            "{subcommand}: the pod label azure.workload.identity/use"
        );
        for container in containers(deployment) {
            let env = k8s.environment(container);
            assert_eq!(
                env.get("MARKETPLACE_CREDENTIAL").map(String::as_str),
                Some("workload_identity"),
                "{subcommand}"
            );
            assert!(
                !env.contains_key("MARKETPLACE_CLIENT_SECRET"),
                "{subcommand}: no client secret"
            );
            let settings = settings_from(&env, subcommand);
            assert_eq!(
                settings
                    .marketplace
                    .client_id
                    .map(|id| id.to_string())
                    .as_deref(),
                Some(client_id),
                "{subcommand}: MARKETPLACE_CLIENT_ID is the service account's app"
            );
        }
    }
}

#[test]
fn the_secret_template_holds_placeholders_only() {
    let k8s = Kubernetes::load();
    let secrets = k8s.of_kind("Secret");
    assert!(!secrets.is_empty());
    for secret in secrets {
        let name = str_at(secret, "/metadata/name");
        assert!(
            secret["data"].is_null(),
            "{name}: base64 `data` hides what it holds; use stringData placeholders"
        );
        let values = secret["stringData"].as_object().expect("stringData");
        for (key, value) in values {
            let value = value.as_str().unwrap();
            assert!(
                value.contains("CHANGE-ME"),
                "{name}.{key} looks like a real value; use a CHANGE-ME placeholder"
            );
            if let Ok(parsed) = Url::parse(value)
                && let Some(password) = parsed.password()
            {
                assert_eq!(password, "CHANGE-ME", "{name}.{key}: password");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Environment variables

#[test]
fn every_environment_variable_deployed_is_read_by_the_app_and_documented() {
    let known: BTreeSet<&str> = ENV_KEYS
        .iter()
        .map(|(var, _)| *var)
        .chain([CONFIG_FILE_ENV])
        .chain(OTHER_ENV.iter().copied())
        .collect();
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut note = |var: &str, place: String| {
        used.entry(var.to_string()).or_default().insert(place);
    };

    let compose = Compose::load();
    for (name, _) in compose.app_services() {
        for var in compose.environment(name).keys() {
            note(var, format!("compose {name}"));
        }
    }
    let k8s = Kubernetes::load();
    for (workload, container) in k8s.workload_containers() {
        for var in k8s.environment(container).keys() {
            note(var, format!("kubernetes {workload}"));
        }
    }
    for (key, _) in Dockerfile::load().env() {
        note(&key, "Dockerfile".into());
    }
    assert!(used.contains_key("DATABASE_URL") && used.contains_key("AMQP_URL"));

    let readme = read(&root().join("docs/configuration.md"));
    for (var, places) in &used {
        assert!(
            known.contains(var.as_str()),
            "{var} (set by {places:?}) is not a variable the app reads"
        );
        assert!(
            readme.contains(&format!("`{var}`")),
            "{var} (set by {places:?}) is not documented in docs/configuration.md"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Dockerfile

struct Dockerfile {
    /// (INSTRUCTION, arguments), continuation lines joined, comments dropped.
    instructions: Vec<(String, String)>,
}

impl Dockerfile {
    fn load() -> Self {
        let text = read(&deploy().join("Dockerfile"));
        let mut instructions = Vec::new();
        let mut pending = String::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
                continue;
            }
            if let Some(head) = trimmed.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            pending.push_str(trimmed);
            let (instruction, args) = pending
                .split_once(char::is_whitespace)
                .unwrap_or((&pending, ""));
            instructions.push((instruction.to_uppercase(), args.trim().to_string()));
            pending.clear();
        }
        Self { instructions }
    }

    fn stages(&self) -> Vec<&[(String, String)]> {
        let starts: Vec<usize> = self
            .instructions
            .iter()
            .enumerate()
            .filter(|(_, (i, _))| i == "FROM")
            .map(|(at, _)| at)
            .collect();
        starts
            .iter()
            .enumerate()
            .map(|(n, &start)| {
                let end = starts
                    .get(n + 1)
                    .copied()
                    .unwrap_or(self.instructions.len());
                &self.instructions[start..end]
            })
            .collect()
    }

    fn final_stage(&self) -> &[(String, String)] {
        self.stages().last().copied().expect("a FROM")
    }

    fn arg(&self, name: &str) -> Option<String> {
        self.instructions.iter().find_map(|(i, args)| {
            (i == "ARG").then(|| args.strip_prefix(&format!("{name}=")).map(str::to_string))?
        })
    }

    /// `ENV` keys of the final stage.
    fn env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        for (_, args) in self.final_stage().iter().filter(|(i, _)| i == "ENV") {
            for pair in args.split_whitespace() {
                let (key, value) = pair.split_once('=').expect("ENV KEY=VALUE");
                env.push((key.to_string(), value.to_string()));
            }
        }
        env
    }
}

fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|_| panic!("{args} is not the exec (JSON) form"))
}

#[test]
fn the_dockerfile_builds_in_stages_and_runs_the_binary_as_non_root() {
    let dockerfile = Dockerfile::load();
    let stages = dockerfile.stages();
    assert!(stages.len() >= 2, "a multi-stage build");

    // The builder: a Rust image at least as new as the workspace's rust-version, dependencies
    // cooked in their own layer, then the release binary.
    let rust = dockerfile.arg("RUST_VERSION").expect("ARG RUST_VERSION=…");
    let manifest = read(&root().join("Cargo.toml"));
    let required = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("rust-version = \""))
        .and_then(|l| l.split('"').next())
        .expect("the workspace's rust-version");
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    assert!(
        version(&rust) >= version(required),
        "Rust {rust} < rust-version {required}"
    );
    assert!(
        stages[0][0].1.starts_with("rust:${RUST_VERSION}"),
        "{:?}",
        stages[0][0]
    );
    let runs: Vec<&String> = dockerfile
        .instructions
        .iter()
        .filter(|(i, _)| i == "RUN")
        .map(|(_, a)| a)
        .collect();
    let cook = runs.iter().position(|r| r.contains("cargo chef cook"));
    let build = runs
        .iter()
        .position(|r| r.contains("cargo build --release --locked --bin fulfillment"));
    assert!(
        matches!((cook, build), (Some(c), Some(b)) if c < b),
        "dependencies must be cooked before the binary is built"
    );

    // The runtime: the binary from the builder, a numeric non-root user, the binary as the
    // entrypoint and `serve` as the default command.
    let runtime = dockerfile.final_stage();
    assert!(
        !runtime[0].1.contains("rust:"),
        "the runtime image carries no toolchain"
    );
    assert!(
        runtime
            .iter()
            .any(|(i, args)| i == "COPY" && args.starts_with("--from=") && args.ends_with(BINARY)),
        "the final stage copies the built binary to {BINARY}"
    );
    let user = runtime
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, user)| user.split(':').next().unwrap().to_string())
        .expect("USER in the final stage");
    assert!(
        user.parse::<u32>().is_ok_and(|uid| uid != 0),
        "USER {user} must be a numeric non-root uid (Kubernetes' runAsNonRoot checks it)"
    );
    let last = |name: &str| {
        runtime
            .iter()
            .rev()
            .find(|(i, _)| i == name)
            .map(|(_, a)| exec_form(a))
            .unwrap_or_else(|| panic!("no {name} in the final stage"))
    };
    assert_eq!(last("ENTRYPOINT"), [BINARY]);
    assert_eq!(last("CMD"), ["serve"]);
}

#[test]
fn the_build_context_keeps_the_sources_and_drops_target_and_git() {
    let ignore = read(&root().join(".dockerignore"));
    let patterns: Vec<(bool, String)> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.strip_prefix('!') {
            Some(p) => (false, p.trim_end_matches('/').to_string()),
            None => (true, l.trim_end_matches('/').to_string()),
        })
        .collect();
    // The last matching pattern wins, as in Docker.
    let excluded = |path: &str| {
        let matches = |pattern: &str| {
            if let Some(suffix) = pattern.strip_prefix('*') {
                !path.contains('/') && path.ends_with(suffix)
            } else {
                path == pattern || path.starts_with(&format!("{pattern}/"))
            }
        };
        patterns
            .iter()
            .rev()
            .find(|(_, p)| matches(p))
            .is_some_and(|(exclude, _)| *exclude)
    };
    for kept in [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "state-machine/Cargo.toml",
        "state-machine/src/lib.rs",
        "migrations/20261124090001_subscriptions.sql",
        "deploy/docker/http-probe",
    ] {
        assert!(!excluded(kept), "{kept} must stay in the build context");
        assert!(root().join(kept).exists(), "{kept} does not exist");
    }
    for dropped in ["target/debug/fulfillment", ".git"] {
        assert!(
            excluded(dropped),
            "{dropped} must not be sent to the builder"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Grafana

/// The metric names a PromQL expression reads: identifiers that are not functions,
/// aggregations, keywords, label names, strings or durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const NOT_METRICS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |i: &mut usize, close: char| {
        while *i < chars.len() && chars[*i] != close {
            *i += 1;
        }
        *i += 1;
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                skip_to(&mut i, c);
            }
            '{' => skip_to(&mut i, '}'),
            '[' => skip_to(&mut i, ']'),
            '$' => {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || "_{}".contains(chars[i])) {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i]))
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let call = chars.get(next) == Some(&'(');
                if matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) && call
                {
                    i = next;
                    skip_to(&mut i, ')');
                } else if !call && !NOT_METRICS.contains(&word.as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn promql_metric_extraction_ignores_functions_labels_and_durations() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, route) (rate(http_request_duration_seconds_bucket{route="/webhook", status=~"5.."}[$__rate_interval]))) / on (route) group_left max without (instance) (fulfillment_outbox_backlog offset 5m)"#,
    );
    assert_eq!(
        names,
        BTreeSet::from([
            "http_request_duration_seconds_bucket".to_string(),
            "fulfillment_outbox_backlog".to_string()
        ])
    );
}

#[test]
fn the_grafana_dashboard_reads_only_exported_metrics_through_its_data_source_variable() {
    let dashboard = json(&deploy().join("grafana/fulfillment.json"));
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    assert!(
        variables.iter().any(|v| v["name"] == "DS_PROMETHEUS"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a DS_PROMETHEUS data source variable"
    );
    let allowed: BTreeSet<String> = COUNTERS_AND_GAUGES
        .iter()
        .map(|m| m.to_string())
        .chain(
            HISTOGRAMS
                .iter()
                .flat_map(|h| ["_bucket", "_sum", "_count"].map(|suffix| format!("{h}{suffix}"))),
        )
        .collect();

    let mut panels: Vec<&Value> = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = stack.pop() {
        stack.extend(panel["panels"].as_array().into_iter().flatten());
        if panel["type"] != "row" {
            panels.push(panel);
        }
    }
    assert!(panels.len() >= 10, "{} panels", panels.len());

    let mut read = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "{title}: duplicate id"
        );
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
            let expr = str_at(target, "/expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{title}: {expr} reads no metric");
            for name in names {
                assert!(
                    allowed.contains(&name),
                    "{title}: {name} is not an exported metric"
                );
                read.insert(
                    HISTOGRAMS
                        .iter()
                        .find(|h| name.starts_with(*h))
                        .map_or(name.clone(), |h| h.to_string()),
                );
            }
        }
    }
    let every: BTreeSet<String> = COUNTERS_AND_GAUGES
        .iter()
        .chain(HISTOGRAMS)
        .map(|m| m.to_string())
        .collect();
    let missing: Vec<&String> = every.difference(&read).collect();
    assert!(missing.is_empty(), "no panel shows {missing:?}");

    // Webhook → ACK latency: p50 and p99 against Microsoft's 10 s auto-accept window.
    let ack = panels
        .iter()
        .find(|p| {
            p.to_string()
                .contains("fulfillment_webhook_to_ack_seconds_bucket")
        })
        .unwrap();
    let exprs = ack["targets"].to_string();
    assert!(exprs.contains("histogram_quantile(0.50") && exprs.contains("histogram_quantile(0.99"));
    assert_eq!(ack["fieldConfig"]["defaults"]["unit"], "s");
    assert_eq!(
        ack["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"],
        "line"
    );
    let steps = ack["fieldConfig"]["defaults"]["thresholds"]["steps"]
        .as_array()
        .unwrap();
    assert!(
        steps.iter().any(|s| s["value"].as_f64() == Some(10.0)),
        "a threshold line at 10 s"
    );
}
