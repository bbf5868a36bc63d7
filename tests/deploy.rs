//! The deployment files in `deploy/`: parsed and checked against each other and against the
//! server's code (flags in `src/`, metric names in `src/metrics.rs`). Docker and a cluster are not
//! needed; `nginx -t` runs when nginx is installed (required when `TANDEM_TEST_NGINX=1`, which
//! `scripts/test.sh` sets after installing it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_yaml_ng::Value;

/// The server's default `--shutdown-timeout`.
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every document of a (multi-document) YAML file, merge keys (`<<`) applied.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    let mut docs = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(&text) {
        let mut doc: Value = serde::Deserialize::deserialize(de)
            .unwrap_or_else(|e| panic!("{rel}: not valid YAML: {e}"));
        doc.apply_merge()
            .unwrap_or_else(|e| panic!("{rel}: bad merge key: {e}"));
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    docs
}

/// The value at a path of mapping keys.
fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

/// A mapping of strings as a map (labels, selectors, compose environments in mapping form).
fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    let Some(v) = v else {
        return BTreeMap::new();
    };
    if let Some(seq) = v.as_sequence() {
        // Compose's list form: `- KEY=VALUE`.
        return seq
            .iter()
            .filter_map(Value::as_str)
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_string(), v.to_string())
            })
            .collect();
    }
    let map = v
        .as_mapping()
        .unwrap_or_else(|| panic!("expected a mapping, got {v:?}"));
    map.iter()
        .map(|(k, v)| {
            let k = k.as_str().expect("string key").to_string();
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => panic!("{k}: expected a scalar, got {other:?}"),
            };
            (k, v)
        })
        .collect()
}

fn duration(s: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("bad duration {s:?}: {e}"))
}

/// Every `"TANDEM_…"` string literal in the server's source.
fn env_vars_in_source() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut dirs = vec![root().join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for piece in text.split("\"TANDEM_").skip(1) {
                    if let Some((name, _)) = piece.split_once('"') {
                        names.insert(format!("TANDEM_{name}"));
                    }
                }
            }
        }
    }
    names
}

fn assert_known_env(context: &str, env: &BTreeMap<String, String>) {
    let known = env_vars_in_source();
    for name in env.keys().filter(|k| k.starts_with("TANDEM_")) {
        assert!(
            known.contains(name),
            "{context}: {name} is not an environment variable the server reads"
        );
    }
}

/// The port of a `HOST:PORT` bind address.
fn bind_port(bind: &str) -> u16 {
    bind.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("bad bind address {bind:?}"))
}

// ---- compose ---------------------------------------------------------------------------------

const COMPOSE: &str = "deploy/compose.yaml";

fn compose() -> Value {
    let mut docs = yaml_docs(COMPOSE);
    assert_eq!(docs.len(), 1, "{COMPOSE}: one document");
    docs.remove(0)
}

/// The services built from the repository's Dockerfile: the tandem nodes.
fn tandem_nodes(compose: &Value) -> Vec<(String, Value)> {
    let services = at(compose, &["services"])
        .and_then(Value::as_mapping)
        .expect("services");
    services
        .iter()
        .filter(|(_, s)| at(s, &["build"]).is_some())
        .map(|(name, s)| (name.as_str().unwrap().to_string(), s.clone()))
        .collect()
}

/// The `host` of `set $tandem http://host:port;` in nginx.conf, and the port.
fn nginx_backend(conf: &str) -> (String, u16) {
    let line = strip_nginx_comments(conf)
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("set $tandem "))
        .map(|l| l.trim_end_matches(';').trim().to_string())
        .expect("nginx.conf: `set $tandem http://HOST:PORT;`");
    let hostport = line
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("nginx.conf: $tandem is not an http:// URL: {line}"));
    let (host, port) = hostport.rsplit_once(':').expect("HOST:PORT");
    (host.to_string(), port.parse().expect("port"))
}

#[test]
fn compose_has_the_services_and_their_wiring() {
    let c = compose();
    let services = at(&c, &["services"]).expect("services");
    for name in ["postgres", "redis", "nginx"] {
        assert!(services.get(name).is_some(), "{COMPOSE}: no {name} service");
    }
    let image = |name: &str| str_at(services, &[name, "image"]).unwrap_or_default();
    assert!(image("postgres").starts_with("postgres:16"), "Postgres 16");
    assert!(image("redis").starts_with("redis:7"), "Redis 7");

    let nodes = tandem_nodes(&c);
    assert!(
        nodes.len() >= 2,
        "{COMPOSE}: two tandem nodes, found {nodes:?}"
    );
    let (backend_host, backend_port) = nginx_backend(&read("deploy/nginx.conf"));
    let mut node_ids = BTreeSet::new();
    for (name, node) in &nodes {
        let context = str_at(node, &["build", "context"]).expect("build.context");
        let dockerfile = str_at(node, &["build", "dockerfile"]).unwrap_or("Dockerfile");
        assert_eq!(context, "..", "{name}: built from the repository root");
        assert!(
            root()
                .join("deploy")
                .join(context)
                .join(dockerfile)
                .is_file(),
            "{name}: {dockerfile} not found in {context}"
        );

        let env = string_map(at(node, &["environment"]));
        assert_known_env(name, &env);
        let get = |k: &str| {
            env.get(k)
                .unwrap_or_else(|| panic!("{name}: {k} not set"))
                .as_str()
        };
        assert!(get("TANDEM_DATABASE_URL").starts_with("postgres://"));
        assert!(get("TANDEM_DATABASE_URL").contains("@postgres:"));
        assert_eq!(get("TANDEM_REDIS_URL"), "redis://redis:6379");
        assert_eq!(get("TANDEM_BIND"), "0.0.0.0:1234");
        assert!(
            get("TANDEM_JWT_SECRET").starts_with("${TANDEM_JWT_SECRET:?"),
            "{name}: the JWT secret must be required from the environment"
        );
        // Behind nginx every client has nginx's address: the nodes must not limit by address
        // (nginx.conf does, with limit_conn).
        assert_eq!(
            get("TANDEM_MAX_CONNECTIONS_PER_IP"),
            "0",
            "{name}: the per-address limit would count nginx as one client"
        );
        assert!(
            node_ids.insert(get("TANDEM_NODE_ID").to_string()),
            "{name}: TANDEM_NODE_ID is not unique"
        );

        // Docker's SIGKILL must not cut the graceful shutdown short.
        let shutdown = env
            .get("TANDEM_SHUTDOWN_TIMEOUT")
            .map_or(DEFAULT_SHUTDOWN_TIMEOUT, |s| duration(s));
        let grace = duration(str_at(node, &["stop_grace_period"]).expect("stop_grace_period"));
        assert!(
            grace > shutdown,
            "{name}: stop_grace_period {grace:?} <= shutdown timeout {shutdown:?}"
        );

        for dep in ["postgres", "redis"] {
            assert_eq!(
                str_at(node, &["depends_on", dep, "condition"]),
                Some("service_healthy"),
                "{name} waits for a healthy {dep}"
            );
        }
        let test = at(node, &["healthcheck", "test"]).expect("healthcheck.test");
        let test = serde_yaml_ng::to_string(test).unwrap();
        assert!(
            test.contains("/healthz"),
            "{name}: healthcheck asks /healthz"
        );
        assert!(
            test.contains(&format!("/{}", bind_port(get("TANDEM_BIND")))),
            "{name}: healthcheck asks the bound port"
        );

        // nginx reaches the nodes through one name that resolves to all of them.
        let aliases = at(node, &["networks", "default", "aliases"])
            .and_then(Value::as_sequence)
            .unwrap_or_else(|| panic!("{name}: network alias {backend_host:?}"));
        assert!(
            aliases.iter().any(|a| a.as_str() == Some(&backend_host)),
            "{name}: nginx proxies to {backend_host}, which is not an alias of this node"
        );
        assert_eq!(bind_port(get("TANDEM_BIND")), backend_port);
        assert!(
            node.get("ports").is_none(),
            "{name}: nodes are reached through nginx, not published"
        );

        assert_eq!(
            str_at(&c, &["services", "nginx", "depends_on", name, "condition"]),
            Some("service_healthy"),
            "nginx waits for a healthy {name}"
        );
    }

    // Every service checks its health, and none disables it.
    for (name, service) in services.as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        let test = at(service, &["healthcheck", "test"])
            .unwrap_or_else(|| panic!("{name}: no healthcheck"));
        let first = test
            .as_sequence()
            .and_then(|s| s.first())
            .and_then(Value::as_str)
            .or(test.as_str());
        assert!(
            matches!(first, Some(f) if f != "NONE"),
            "{name}: healthcheck.test {test:?}"
        );
        assert!(
            at(service, &["healthcheck", "disable"]).is_none(),
            "{name}: healthcheck disabled"
        );
    }

    // nginx serves the config file from this directory.
    let mounts = at(services, &["nginx", "volumes"])
        .and_then(Value::as_sequence)
        .expect("nginx volumes");
    let conf = mounts
        .iter()
        .filter_map(Value::as_str)
        .find(|m| m.contains(":/etc/nginx/nginx.conf"))
        .expect("nginx.conf mounted at /etc/nginx/nginx.conf");
    let source = conf.split(':').next().unwrap();
    assert!(root().join("deploy").join(source).is_file(), "{source}");
    assert!(conf.ends_with(":ro"), "nginx.conf mounted read-only");
    assert!(
        at(services, &["nginx", "ports"]).is_some(),
        "nginx is published"
    );

    // Named volumes are declared.
    let declared: BTreeSet<String> = at(&c, &["volumes"])
        .and_then(Value::as_mapping)
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    assert!(!declared.is_empty(), "named volumes");
    for (name, service) in services.as_mapping().unwrap() {
        for m in at(service, &["volumes"])
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            let source = m.split(':').next().unwrap();
            if !source.starts_with(['.', '/', '~']) {
                assert!(
                    declared.contains(source),
                    "{name:?}: volume {source} is not declared"
                );
            }
        }
    }
    let pg_volumes = at(services, &["postgres", "volumes"])
        .and_then(Value::as_sequence)
        .expect("Postgres volumes");
    assert!(
        pg_volumes.iter().filter_map(Value::as_str).any(|m| {
            let source = m.split(':').next().unwrap();
            declared.contains(source) && m.contains(":/var/lib/postgresql/data")
        }),
        "Postgres keeps its data in a named volume"
    );
}

// ---- nginx -----------------------------------------------------------------------------------

fn strip_nginx_comments(conf: &str) -> String {
    // No directive of ours has '#' inside a quoted string.
    conf.lines()
        .map(|l| l.split('#').next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn nginx_conf_proxies_websockets_without_stickiness() {
    let conf = strip_nginx_comments(&read("deploy/nginx.conf"));
    let directives: Vec<String> = conf
        .split([';', '{', '}'])
        .map(|d| d.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|d| !d.is_empty())
        .collect();
    let has = |d: &str| directives.iter().any(|x| x == d);
    assert!(has("proxy_http_version 1.1"));
    assert!(has("proxy_set_header Upgrade $http_upgrade"));
    assert!(has("proxy_set_header Connection $connection_upgrade"));
    for timeout in ["proxy_read_timeout", "proxy_send_timeout"] {
        let value = directives
            .iter()
            .find_map(|d| d.strip_prefix(&format!("{timeout} ")))
            .unwrap_or_else(|| panic!("{timeout} is set"));
        let value = duration(value);
        assert!(
            value >= Duration::from_secs(300),
            "{timeout} {value:?} is long"
        );
    }
    for sticky in ["ip_hash", "hash ", "sticky", "least_conn"] {
        assert!(
            !directives.iter().any(|d| d.starts_with(sticky)),
            "no {sticky}: plain round-robin"
        );
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert!(has(&format!("location = {path}")), "location {path}");
    }
    assert!(has("location /"), "rooms are proxied");
    assert!(
        directives
            .iter()
            .any(|d| d.starts_with("limit_conn per_client ")),
        "nginx limits connections per client address (the nodes cannot: they see nginx's)"
    );
    // Every proxy_pass goes to the node group.
    assert!(directives
        .iter()
        .filter(|d| d.starts_with("proxy_pass "))
        .all(|d| d == "proxy_pass $tandem"));
}

/// `nginx` on PATH, or where distributions put it outside a normal user's PATH.
fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
}

#[test]
fn nginx_accepts_the_config() {
    let Some(nginx) = find_nginx() else {
        assert!(
            std::env::var("TANDEM_TEST_NGINX").as_deref() != Ok("1"),
            "TANDEM_TEST_NGINX=1 but nginx is not installed"
        );
        eprintln!("SKIPPED nginx_accepts_the_config: nginx is not installed (scripts/test.sh installs it)");
        return;
    };
    // A copy, so that nginx's prefix (relative paths) is a scratch directory.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nginx.conf");
    std::fs::copy(root().join("deploy/nginx.conf"), &conf).unwrap();
    let out = Command::new(&nginx)
        .arg("-t")
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", nginx.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("test is successful"),
        "nginx -t failed ({}):\n{stderr}",
        out.status
    );
}

// ---- kubernetes ------------------------------------------------------------------------------

const K8S: &str = "deploy/kubernetes";

/// Every document of every YAML file in deploy/kubernetes, by file name.
fn k8s_docs() -> BTreeMap<String, Vec<Value>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(root().join(K8S)).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") || name.ends_with(".yml") {
            let docs = yaml_docs(&format!("{K8S}/{name}"));
            assert!(!docs.is_empty(), "{name}: empty");
            files.insert(name, docs);
        }
    }
    files
}

/// The one document of `kind` in the applied files (not the examples).
fn one_of_kind<'a>(files: &'a BTreeMap<String, Vec<Value>>, kind: &str) -> &'a Value {
    let found: Vec<&Value> = files
        .iter()
        .filter(|(name, _)| !name.contains(".example."))
        .flat_map(|(_, docs)| docs)
        .filter(|d| str_at(d, &["kind"]) == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

/// Every pair of `selector` is among `labels`.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn as_u64(v: Option<&Value>) -> Option<u64> {
    v.and_then(Value::as_u64)
}

#[test]
fn kubernetes_manifests_are_consistent() {
    let files = k8s_docs();
    for (name, docs) in &files {
        for d in docs {
            assert!(str_at(d, &["apiVersion"]).is_some(), "{name}: apiVersion");
            let kind = str_at(d, &["kind"]).unwrap_or_else(|| panic!("{name}: kind"));
            if kind != "Kustomization" {
                assert!(
                    str_at(d, &["metadata", "name"]).is_some(),
                    "{name}: metadata.name"
                );
            }
        }
    }

    let deploy = one_of_kind(&files, "Deployment");
    let config = one_of_kind(&files, "ConfigMap");
    let service = one_of_kind(&files, "Service");
    let pdb = one_of_kind(&files, "PodDisruptionBudget");

    // The ConfigMap: string values (Kubernetes refuses others), variables the server reads.
    let data = at(config, &["data"])
        .and_then(Value::as_mapping)
        .expect("ConfigMap data");
    for (k, v) in data {
        assert!(v.is_string(), "ConfigMap {k:?}: values must be strings");
    }
    let cfg = string_map(at(config, &["data"]));
    assert_known_env("configmap.yaml", &cfg);
    let port = bind_port(cfg.get("TANDEM_BIND").expect("TANDEM_BIND"));
    assert!(
        cfg["TANDEM_BIND"].starts_with("0.0.0.0:"),
        "listens on every interface"
    );
    let shutdown = cfg
        .get("TANDEM_SHUTDOWN_TIMEOUT")
        .map_or(DEFAULT_SHUTDOWN_TIMEOUT, |s| duration(s));

    // The Deployment.
    assert!(
        as_u64(at(deploy, &["spec", "replicas"])).unwrap_or(1) >= 2,
        "2+ replicas"
    );
    let pod_labels = string_map(at(deploy, &["spec", "template", "metadata", "labels"]));
    let matched = string_map(at(deploy, &["spec", "selector", "matchLabels"]));
    assert!(
        selects(&matched, &pod_labels),
        "the Deployment selects its pods"
    );
    let pod = at(deploy, &["spec", "template", "spec"]).expect("pod spec");
    let containers = at(pod, &["containers"])
        .and_then(Value::as_sequence)
        .expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    let ports = at(c, &["ports"])
        .and_then(Value::as_sequence)
        .expect("ports");
    let named: BTreeMap<String, u64> = ports
        .iter()
        .filter_map(|p| {
            Some((
                str_at(p, &["name"])?.to_string(),
                as_u64(p.get("containerPort"))?,
            ))
        })
        .collect();
    assert!(
        named.values().any(|&p| p == u64::from(port)),
        "containerPort {port}"
    );
    let resolve = |v: &Value| -> u64 {
        v.as_u64().unwrap_or_else(|| {
            let name = v.as_str().expect("port name or number");
            *named
                .get(name)
                .unwrap_or_else(|| panic!("no container port named {name}"))
        })
    };
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(
            str_at(c, &[probe, "httpGet", "path"]),
            Some(path),
            "{probe} path"
        );
        let p = at(c, &[probe, "httpGet", "port"]).unwrap_or_else(|| panic!("{probe} port"));
        assert_eq!(resolve(p), u64::from(port), "{probe} port");
    }

    // Shutdown: preStop sleep, then SIGTERM and up to the shutdown timeout, all within the grace.
    let command: Vec<&str> = at(c, &["lifecycle", "preStop", "exec", "command"])
        .and_then(Value::as_sequence)
        .expect("preStop exec command")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(command.first(), Some(&"sleep"), "preStop sleeps");
    let pre_stop = duration(&format!("{}s", command[1]));
    let grace = Duration::from_secs(
        as_u64(at(pod, &["terminationGracePeriodSeconds"])).expect("terminationGracePeriodSeconds"),
    );
    assert!(grace > DEFAULT_SHUTDOWN_TIMEOUT);
    assert!(
        grace > pre_stop + shutdown,
        "terminationGracePeriodSeconds {grace:?} <= preStop {pre_stop:?} + shutdown {shutdown:?}"
    );

    // Security: uid 10001 (the image's user), non-root, read-only root with a writable data dir.
    let run_as_non_root = at(c, &["securityContext", "runAsNonRoot"])
        .or(at(pod, &["securityContext", "runAsNonRoot"]))
        .and_then(Value::as_bool);
    assert_eq!(run_as_non_root, Some(true), "runAsNonRoot");
    let uid = as_u64(at(c, &["securityContext", "runAsUser"]))
        .or(as_u64(at(pod, &["securityContext", "runAsUser"])));
    assert_eq!(uid, Some(10001), "runAsUser 10001");
    assert_eq!(
        at(c, &["securityContext", "readOnlyRootFilesystem"]).and_then(Value::as_bool),
        Some(true)
    );
    let mount = at(c, &["volumeMounts"])
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .find(|m| str_at(m, &["mountPath"]) == Some("/var/lib/tandem"))
        .expect("a volume at /var/lib/tandem");
    let volume = at(pod, &["volumes"])
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .find(|v| str_at(v, &["name"]) == str_at(mount, &["name"]))
        .expect("the data volume");
    assert!(
        volume.get("emptyDir").is_some(),
        "the data dir is an emptyDir"
    );
    assert!(at(c, &["resources", "requests"]).is_some(), "resources");

    // Environment: the ConfigMap, and secrets from a Secret that the example defines.
    let config_name = str_at(config, &["metadata", "name"]).unwrap();
    assert!(
        at(c, &["envFrom"])
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .any(|e| str_at(e, &["configMapRef", "name"]) == Some(config_name)),
        "envFrom the ConfigMap {config_name}"
    );
    let secret = files
        .values()
        .flatten()
        .find(|d| str_at(d, &["kind"]) == Some("Secret"))
        .expect("a Secret (secret.example.yaml)");
    let secret_name = str_at(secret, &["metadata", "name"]).unwrap();
    let secret_keys: BTreeSet<String> = ["stringData", "data"]
        .iter()
        .flat_map(|k| string_map(secret.get(*k)).into_keys())
        .collect();
    let env: Vec<&Value> = at(c, &["env"])
        .and_then(Value::as_sequence)
        .expect("env")
        .iter()
        .collect();
    let env_names: BTreeMap<String, String> = env
        .iter()
        .map(|e| (str_at(e, &["name"]).unwrap().to_string(), String::new()))
        .collect();
    assert_known_env("deployment.yaml", &env_names);
    for e in &env {
        if let Some(r) = at(e, &["valueFrom", "secretKeyRef"]) {
            assert_eq!(str_at(r, &["name"]), Some(secret_name));
            let key = str_at(r, &["key"]).unwrap();
            assert!(secret_keys.contains(key), "the Secret has no key {key}");
        }
    }
    let jwt = env
        .iter()
        .find(|e| str_at(e, &["name"]) == Some("TANDEM_JWT_SECRET"))
        .expect("TANDEM_JWT_SECRET");
    assert!(
        at(jwt, &["valueFrom", "secretKeyRef"]).is_some(),
        "the JWT secret comes from the Secret"
    );
    assert!(
        !cfg.contains_key("TANDEM_JWT_SECRET") && !cfg.contains_key("TANDEM_DATABASE_URL"),
        "secrets are not in the ConfigMap"
    );

    // The Service and the PDB select the Deployment's pods.
    let selector = string_map(at(service, &["spec", "selector"]));
    assert!(
        selects(&selector, &pod_labels),
        "the Service selects the pods"
    );
    for p in at(service, &["spec", "ports"])
        .and_then(Value::as_sequence)
        .expect("Service ports")
    {
        let target = p.get("targetPort").expect("targetPort");
        assert_eq!(resolve(target), u64::from(port), "Service targetPort");
    }
    let pdb_selector = string_map(at(pdb, &["spec", "selector", "matchLabels"]));
    assert!(
        selects(&pdb_selector, &pod_labels),
        "the PDB selects the pods"
    );
    let replicas = as_u64(at(deploy, &["spec", "replicas"])).unwrap();
    match (
        at(pdb, &["spec", "minAvailable"]),
        at(pdb, &["spec", "maxUnavailable"]),
    ) {
        (Some(min), None) => {
            if let Some(min) = min.as_u64() {
                assert!(
                    min < replicas,
                    "minAvailable below replicas, or nodes never drain"
                );
            }
        }
        (None, Some(_)) => {}
        _ => panic!("the PDB sets one of minAvailable and maxUnavailable"),
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let docs = yaml_docs(&format!("{K8S}/kustomization.yaml"));
    let resources: BTreeSet<String> = at(&docs[0], &["resources"])
        .and_then(Value::as_sequence)
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    for r in &resources {
        assert!(root().join(K8S).join(r).is_file(), "resource {r} exists");
    }
    // Every manifest is applied, except the kustomization itself and the examples.
    for name in k8s_docs().keys() {
        if name != "kustomization.yaml" && !name.contains(".example.") {
            assert!(resources.contains(name), "kustomization.yaml omits {name}");
        }
    }
}

// ---- grafana ---------------------------------------------------------------------------------

/// The metric names a PromQL expression reads, and for each whether it is read inside a rate-like
/// function and inside histogram_quantile; plus the labels of its `by (...)` clauses.
#[derive(Debug, Default)]
struct PromqlUse {
    metrics: Vec<(String, bool, bool)>,
    by_labels: BTreeSet<String>,
}

const AGGREGATIONS: &[&str] = &[
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
];
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "atan2"];
const RATES: &[&str] = &["rate", "irate", "increase"];

/// A small PromQL scanner: enough to tell metric names from functions, label matchers, label
/// lists, ranges, strings, numbers and Grafana variables.
fn promql_use(expr: &str) -> PromqlUse {
    let chars: Vec<char> = expr.chars().collect();
    let mut used = PromqlUse::default();
    // Open parentheses, each with the function it belongs to (empty for grouping).
    let mut stack: Vec<String> = Vec::new();
    let mut pending_fn: Option<String> = None;
    let mut i = 0;
    let skip_string = |i: &mut usize| {
        let quote = chars[*i];
        *i += 1;
        while *i < chars.len() && chars[*i] != quote {
            if chars[*i] == '\\' {
                *i += 1;
            }
            *i += 1;
        }
        *i += 1;
    };
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    while i < chars.len() {
        let ch = chars[i];
        match ch {
            '"' | '\'' | '`' => skip_string(&mut i),
            '{' | '[' => {
                let close = if ch == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    if matches!(chars[i], '"' | '\'' | '`') {
                        skip_string(&mut i);
                    } else {
                        i += 1;
                    }
                }
                i += 1;
            }
            '$' => {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || "_{}".contains(chars[i])) {
                    i += 1;
                }
            }
            '(' => {
                stack.push(pending_fn.take().unwrap_or_default());
                i += 1;
            }
            ')' => {
                stack.pop().expect("balanced parentheses");
                i += 1;
            }
            c if c.is_ascii_digit() || c == '.' => {
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
                let ident: String = chars[start..i].iter().collect();
                let mut j = i;
                skip_ws(&mut j);
                let next = chars.get(j).copied();
                if LABEL_LISTS.contains(&ident.as_str()) {
                    // `by (a, b)`: labels, not metrics.
                    if next == Some('(') {
                        let end = chars[j..].iter().position(|&c| c == ')').unwrap() + j;
                        let labels: String = chars[j + 1..end].iter().collect();
                        if ident == "by" {
                            used.by_labels.extend(
                                labels
                                    .split(',')
                                    .map(|l| l.trim().to_string())
                                    .filter(|l| !l.is_empty()),
                            );
                        }
                        i = end + 1;
                    }
                } else if next == Some('(') || AGGREGATIONS.contains(&ident.as_str()) {
                    pending_fn = Some(ident);
                } else if !KEYWORDS.contains(&ident.as_str()) {
                    let in_rate = stack.iter().any(|f| RATES.contains(&f.as_str()));
                    let in_quantile = stack.iter().any(|f| f == "histogram_quantile");
                    used.metrics.push((ident, in_rate, in_quantile));
                }
            }
            _ => i += 1,
        }
    }
    assert!(stack.is_empty(), "unbalanced parentheses in {expr}");
    used
}

/// The text of the metrics module (a file, or a directory of them).
fn metrics_source() -> String {
    let mut text = std::fs::read_to_string(root().join("src/metrics.rs")).unwrap_or_default();
    if let Ok(dir) = std::fs::read_dir(root().join("src/metrics")) {
        for entry in dir {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                text.push_str(&std::fs::read_to_string(path).unwrap());
            }
        }
    }
    assert!(!text.is_empty(), "src/metrics.rs");
    text
}

/// Whether `name` occurs in `text` as a whole identifier.
fn has_identifier(text: &str, name: &str) -> bool {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    text.match_indices(name).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + name.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

#[test]
fn promql_scanner_tells_metrics_from_the_rest() {
    let u = promql_use(
        r#"histogram_quantile(0.99, sum by (le) (rate(a_bucket{instance=~"$instance", x="}"}[$__rate_interval]))) / on (job) sum(b) by (instance) + max without (code) (c_total offset 5m) > bool 1e3"#,
    );
    let names: Vec<(&str, bool, bool)> = u
        .metrics
        .iter()
        .map(|(n, r, q)| (n.as_str(), *r, *q))
        .collect();
    assert_eq!(
        names,
        [
            ("a_bucket", true, true),
            ("b", false, false),
            ("c_total", false, false)
        ]
    );
    assert_eq!(
        u.by_labels,
        BTreeSet::from(["le".to_string(), "instance".to_string()])
    );
}

#[test]
fn grafana_dashboard_uses_existing_metrics_correctly() {
    let text = read("deploy/grafana/tandem-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let schema = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(dash["uid"].is_string() && dash["title"].is_string());

    let vars = dash["templating"]["list"].as_array().expect("templating");
    let ds_var = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds_var["name"], "DS_PROMETHEUS");
    assert_eq!(ds_var["query"], "prometheus");
    let ds_uid = "${DS_PROMETHEUS}";
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"]["uid"], ds_uid, "variable {}", v["name"]);
    }

    let source = metrics_source();
    let mut ids = BTreeSet::new();
    let mut exprs = 0;
    let mut panels: Vec<&serde_json::Value> =
        dash["panels"].as_array().expect("panels").iter().collect();
    // Collapsed rows hold their panels inside.
    let nested: Vec<&serde_json::Value> = panels
        .iter()
        .filter_map(|p| p["panels"].as_array())
        .flatten()
        .collect();
    panels.extend(nested);
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "{title}: duplicate id"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && grid["h"].as_u64().unwrap() > 0,
            "{title}: gridPos"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], ds_uid, "{title}: datasource");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            if !t["datasource"].is_null() {
                assert_eq!(t["datasource"]["uid"], ds_uid, "{title}: target datasource");
            }
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: target without expr"));
            exprs += 1;
            let used = promql_use(expr);
            assert!(!used.metrics.is_empty(), "{title}: {expr} reads no metric");
            for (name, in_rate, in_quantile) in &used.metrics {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|base| has_identifier(&source, base));
                assert!(
                    has_identifier(&source, name) || base.is_some(),
                    "{title}: {name} is not a metric of src/metrics.rs"
                );
                if *in_rate {
                    assert!(
                        ["_total", "_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name.ends_with(s)),
                        "{title}: rate() of {name}, which is not a counter"
                    );
                }
                if *in_quantile {
                    assert!(
                        name.ends_with("_bucket"),
                        "{title}: histogram_quantile over {name}"
                    );
                }
            }
            if expr.contains("histogram_quantile") {
                assert!(
                    used.by_labels.contains("le"),
                    "{title}: histogram_quantile needs the le label kept: {expr}"
                );
                assert!(
                    used.metrics.iter().all(|(_, in_rate, _)| *in_rate),
                    "{title}: histogram_quantile over rates of buckets: {expr}"
                );
            }
        }
    }
    assert!(exprs >= 10, "the dashboard has {exprs} queries");
}
