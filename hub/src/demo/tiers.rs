//! `hub demo --tiers 3`: a court tree on loopback — the supreme court's hub, a high
//! court's under it, two intermediate courts' under that — each a real hub with its own
//! ports, data dir and CA-issued certificate, linked over QUIC with mutual TLS. Simulated
//! units run under each intermediate court. One env file per hub in the data dir.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tracing::info;

use super::{DemoOptions, absolute, find_field_agent, stop_child, write_routes};
use crate::auth::Role;
use crate::config::{CascadeConfig, Config, CourtConfig, QuicConfig, Tier};
use crate::server::{RunningHub, termination};

struct Node {
    /// File names: supreme, high, intermediate-1, intermediate-2.
    name: &'static str,
    code: &'static str,
    court: &'static str,
    tier: Tier,
    /// Index of the parent node.
    parent: Option<usize>,
    /// Prefix of its simulated units (intermediate courts only).
    units: Option<&'static str>,
}

const TREE: [Node; 4] = [
    Node {
        name: "supreme",
        code: "最高法",
        court: "最高人民法院",
        tier: Tier::Supreme,
        parent: None,
        units: None,
    },
    Node {
        name: "high",
        code: "京",
        court: "北京市高级人民法院",
        tier: Tier::High,
        parent: Some(0),
        units: None,
    },
    Node {
        name: "intermediate-1",
        code: "京01",
        court: "北京市第一中级人民法院",
        tier: Tier::Intermediate,
        parent: Some(1),
        units: Some("bj1-"),
    },
    Node {
        name: "intermediate-2",
        code: "京02",
        court: "北京市第二中级人民法院",
        tier: Tier::Intermediate,
        parent: Some(1),
        units: Some("bj2-"),
    },
];

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let agent = find_field_agent()?;
    let data = absolute(&opts.data_dir);
    let ca_dir = data.join("ca");
    if !ca_dir.join("ca.crt").exists() {
        crate::cascade::cli::init(&ca_dir, "Tianwang demo CA")?;
    }
    let ca_cert = ca_dir.join("ca.crt");
    let mut hubs: Vec<RunningHub> = Vec::new();
    for node in &TREE {
        let dir = data.join(node.name);
        let tls = dir.join("tls");
        if !tls.join("hub.crt").exists() {
            let parent = node.parent.map_or("", |p| TREE[p].code);
            crate::cascade::cli::issue(
                &ca_dir,
                node.code,
                parent,
                &["localhost".into(), "127.0.0.1".into()],
                &tls,
            )?;
        }
        // The top keeps the usual ports; the others take free ones.
        let (quic, http) = if node.parent.is_none() {
            (opts.quic_listen, opts.http_listen)
        } else {
            (loopback(), loopback())
        };
        let parent = node
            .parent
            .map(|p| format!("localhost:{}", hubs[p].quic_addr.port()));
        let config = Config {
            hub_id: format!("demo-{}", node.name),
            data_dir: dir.clone(),
            quic: QuicConfig {
                listen: quic,
                cert: Some(tls.join("hub.crt")),
                key: Some(tls.join("hub.key")),
                ..Default::default()
            },
            http: crate::config::HttpConfig { listen: http },
            court: CourtConfig {
                code: node.code.into(),
                name: node.court.into(),
                tier: node.tier,
            },
            cascade: CascadeConfig {
                ca: Some(ca_cert.clone()),
                parent,
                ..Default::default()
            },
            ..Config::default()
        };
        let hub = RunningHub::start(config)
            .await
            .with_context(|| format!("starting the {} hub", node.name))?;
        hubs.push(hub);
    }

    let day = Duration::from_secs(24 * 3600);
    let mut children = Vec::new();
    let mut summary = String::new();
    for (node, hub) in TREE.iter().zip(&hubs) {
        let authority = &hub.context.authority;
        let token = authority.issue(
            Role::Commander,
            &format!("{}-commander", node.name),
            Some(node.code),
            day,
        )?;
        // The units under this hub: its own, or all those of the intermediates below.
        let units: Vec<String> = TREE
            .iter()
            .filter(|n| covers(node, n))
            .filter_map(|n| n.units)
            .flat_map(|prefix| (1..=opts.units).map(move |i| format!("{prefix}{i}")))
            .collect();
        let env = format!(
            "TIANWANG_HUB={}\nTIANWANG_HTTP=http://{}\nTIANWANG_TOKEN={}\nTIANWANG_CA={}\n\
             TIANWANG_UNITS={}\n",
            hub.quic_addr,
            hub.http_addr,
            token,
            ca_cert.display(),
            units.join(",")
        );
        let env_path = data.join(format!("{}.env", node.name));
        crate::files::write_private(&env_path, env.as_bytes())
            .with_context(|| format!("writing {}", env_path.display()))?;
        let _ = writeln!(
            summary,
            "\n  {:<15} {} ({})\n    console  http://{}/\n    env      {}\n    token    {}",
            node.name,
            node.court,
            node.code,
            hub.http_addr,
            env_path.display(),
            token
        );
        if let Some(prefix) = node.units {
            children.push(simulate(&agent, &data, node, hub, prefix, opts.units, &ca_cert).await?);
        }
    }
    println!(
        "\nTianwang three-tier demo: supreme → high → two intermediate courts, each a hub \
         on loopback,\n{n} simulated units under each intermediate court (bj1-1.., bj2-1..). \
         A console at a\nhigher tier sees and directs every unit below it; an intermediate \
         court only its own.\n{summary}\n",
        n = opts.units,
    );

    let sleep = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = sleep => {}
        _ = termination() => {}
    }
    info!("demo ending");
    for child in &mut children {
        stop_child(child).await;
    }
    // Leaves first, so no parent waits on a child that is going anyway.
    while let Some(hub) = hubs.pop() {
        hub.shutdown().await;
    }
    Ok(())
}

/// Whether `upper` is `lower` or above it in the tree.
fn covers(upper: &Node, lower: &Node) -> bool {
    let mut n = Some(lower);
    while let Some(node) = n {
        if node.code == upper.code {
            return true;
        }
        n = node.parent.map(|p| &TREE[p]);
    }
    false
}

async fn simulate(
    agent: &Path,
    data: &Path,
    node: &Node,
    hub: &RunningHub,
    prefix: &str,
    units: usize,
    ca: &Path,
) -> anyhow::Result<tokio::process::Child> {
    let dir = data.join(node.name);
    let day = Duration::from_secs(24 * 3600);
    let mut tokens = String::new();
    for i in 1..=units {
        let unit = format!("{prefix}{i}");
        let token = hub
            .context
            .authority
            .issue(Role::Device, &unit, Some(node.code), day)?;
        let _ = writeln!(tokens, "{unit} {token}");
    }
    let tokens_path = dir.join("devices.tokens");
    crate::files::write_private(&tokens_path, tokens.as_bytes())
        .with_context(|| format!("writing {}", tokens_path.display()))?;
    let routes = dir.join("routes");
    write_routes(&routes).with_context(|| format!("writing {}", routes.display()))?;
    // The routes are written for sim-N: give this court's units the same walks.
    for i in 1..=units.min(4) {
        let from = routes.join(format!("sim-{i}.route"));
        let to = routes.join(format!("{prefix}{i}.route"));
        std::fs::copy(&from, &to).with_context(|| format!("writing {}", to.display()))?;
    }
    tokio::process::Command::new(agent)
        .arg("simulate")
        .arg("--hub")
        .arg(format!("localhost:{}", hub.quic_addr.port()))
        .arg("--units")
        .arg(units.to_string())
        .arg("--prefix")
        .arg(prefix)
        .arg("--tokens")
        .arg(&tokens_path)
        .arg("--ca")
        .arg(ca)
        .arg("--routes")
        .arg(&routes)
        .arg("--data-dir")
        .arg(dir.join("agents"))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", agent.display()))
}
