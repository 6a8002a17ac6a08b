//! `kv-client top`: the cluster at a glance, refreshed every second — each
//! replica's role, applied index, lag, applied entries per second, and,
//! from its admin listener (`--admin`), client operations per second and
//! their p99 latency; and the faults it has injected.
//!
//! On a terminal it is a full-screen view (ratatui over crossterm; `q` or
//! Ctrl-C quits). Otherwise, or with `--iterations N`, it prints the same
//! table as text N times (for a pipe, a log, a test). The rendering is one
//! function of a [`View`], tested on a buffer.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::Args;
use kv_api::FaultSpec;
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Row, Table, Widget};

use super::output::Reply;
use super::{Failure, Settings};
use crate::Client;

pub(crate) const EXAMPLES: &str = "\
Examples:
  kv-client top
  kv-client top --admin 127.0.0.1:41649,127.0.0.1:38799,127.0.0.1:44035
  kv-client top --iterations 3          # print the table three times and exit

Columns: the replica's id and address; its role (leader, follower, down);
applied (the highest log index it applied); lag (how far behind the most
advanced replica); apl/s (log entries applied per second); ops/s and p99
(client requests per second and their 99th percentile latency in ms, from
its /metrics: needs --admin, one address per replica in replica-file
order); faults (messages its failure injection dropped, delayed, timed out
or refused, in all; needs the admin role with TLS). `q` or Ctrl-C quits.";

/// The arguments of `kv-client top`.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct TopArgs {
    /// The replicas' admin addresses (`kv-server --admin-addr`;
    /// `kv-server cluster` prints them), comma-separated, in replica-file
    /// order: adds ops/s and p99 from their /metrics.
    #[arg(long, value_name = "ADDRS", value_delimiter = ',')]
    pub admin: Vec<String>,
    /// Seconds between refreshes.
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_interval)]
    pub interval: Duration,
    /// Print the table this many times as text and exit (the default when
    /// stdout is not a terminal: once).
    #[arg(long, value_name = "N")]
    pub iterations: Option<u64>,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|_| format!("{s:?} is not seconds"))?;
    if !(0.1..=3600.0).contains(&secs) {
        return Err("the interval must be from 0.1 to 3600 seconds".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// One replica's line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplicaLine {
    /// Its id, if the replica file names it.
    pub id: Option<u64>,
    /// Its client address.
    pub addr: String,
    /// `leader`, `follower` or `down`.
    pub role: String,
    /// The highest log index it applied.
    pub applied: Option<u64>,
    /// How far it is behind the most advanced replica.
    pub lag: Option<u64>,
    /// Log entries applied per second.
    pub applied_per_s: Option<f64>,
    /// Client requests per second (from its metrics).
    pub ops_per_s: Option<f64>,
    /// Their 99th percentile latency, ms (from its metrics).
    pub p99_ms: Option<f64>,
    /// Faults its failure injection has caused, in all.
    pub faults: Option<u64>,
}

/// What one frame shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    /// The title line.
    pub title: String,
    /// One line per replica.
    pub lines: Vec<ReplicaLine>,
}

fn num(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn rate(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

const HEADER: [&str; 9] = [
    "id", "addr", "role", "applied", "lag", "apl/s", "ops/s", "p99 ms", "faults",
];

fn cells(l: &ReplicaLine) -> [String; 9] {
    [
        num(l.id),
        l.addr.clone(),
        l.role.clone(),
        num(l.applied),
        num(l.lag),
        rate(l.applied_per_s),
        rate(l.ops_per_s),
        l.p99_ms.map_or("-".into(), |v| format!("{v:.2}")),
        num(l.faults),
    ]
}

/// Draws `view` into `area` of `buf`.
pub fn render(view: &View, area: Rect, buf: &mut Buffer) {
    let widths = [
        Constraint::Length(4),
        Constraint::Min(15),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(7),
    ];
    let header =
        Row::new(HEADER.map(Cell::from)).style(Style::default().add_modifier(Modifier::BOLD));
    let rows = view.lines.iter().map(|l| {
        let style = match l.role.as_str() {
            "leader" => Style::default().add_modifier(Modifier::BOLD),
            "down" => Style::default().add_modifier(Modifier::DIM),
            _ => Style::default(),
        };
        Row::new(cells(l).map(Cell::from)).style(style)
    });
    Table::new(rows, widths)
        .header(header)
        .block(Block::bordered().title(Line::from(view.title.as_str())))
        .render(area, buf);
}

/// The view as plain text lines (what `--iterations` prints).
pub fn text(view: &View) -> String {
    let mut rows = vec![HEADER.map(String::from)];
    rows.extend(view.lines.iter().map(cells));
    let mut widths = [0usize; 9];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = format!("{}\n", view.title);
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// What the previous sample saw, for rates.
#[derive(Default)]
struct Previous {
    at: Option<Instant>,
    applied: BTreeMap<String, u64>,
    ops: BTreeMap<String, f64>,
    buckets: BTreeMap<String, Vec<(f64, f64)>>,
}

/// Client requests served and the latency histogram (`le` → cumulative
/// count, summed over operations) in a /metrics page.
fn parse_metrics(text: &str) -> (f64, Vec<(f64, f64)>) {
    let mut ops = 0.0;
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if series.starts_with("kvpaxos_client_requests_total{") {
            ops += value;
        } else if let Some(labels) =
            series.strip_prefix("kvpaxos_client_request_duration_seconds_bucket{")
        {
            let le = labels
                .split(',')
                .find_map(|l| l.strip_prefix("le=\""))
                .map(|v| v.trim_end_matches(['"', '}']));
            let le = match le {
                Some("+Inf") => f64::INFINITY,
                Some(v) => match v.parse() {
                    Ok(v) => v,
                    Err(_) => continue,
                },
                None => continue,
            };
            buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += value;
        }
    }
    let mut b: Vec<(f64, f64)> = buckets.into_values().collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    (ops, b)
}

/// The 99th percentile (upper bucket bound, ms) of the observations between
/// two cumulative histograms.
fn p99_ms(now: &[(f64, f64)], before: &[(f64, f64)]) -> Option<f64> {
    let delta: Vec<(f64, f64)> = now
        .iter()
        .map(|&(le, n)| {
            let old = before
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0.0, |(_, n)| *n);
            (le, n - old)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    delta
        .iter()
        .find(|(_, n)| *n >= 0.99 * total)
        .map(|(le, _)| {
            if le.is_finite() {
                le * 1000.0
            } else {
                f64::INFINITY
            }
        })
}

/// GET `/metrics` of an admin listener (plain, or TLS with the client's
/// identity), bounded by `timeout`.
async fn fetch_metrics(
    addr: &str,
    tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let tls = match tls {
            Some(config) => Some((config.clone(), kv_api::tls::server_name_of(addr).ok()?)),
            None => None,
        };
        let mut s = kv_api::tls::dial(addr, tls).await.ok()?;
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        s.take(4 << 20).read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8(out).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_string())
    };
    tokio::time::timeout(timeout, exchange).await.ok()?
}

async fn sample(
    client: &Client,
    ids: &[Option<u64>],
    admin: &[String],
    tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
    timeout: Duration,
    prev: &mut Previous,
) -> View {
    let now = Instant::now();
    let dt = prev.at.map(|t| now.duration_since(t).as_secs_f64());
    let statuses = client.status().await;
    let max_applied = statuses
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok().map(|s| s.applied))
        .max();
    let mut lines = Vec::new();
    for (i, (addr, status)) in statuses.iter().enumerate() {
        let mut line = ReplicaLine {
            id: ids.get(i).copied().flatten(),
            addr: addr.clone(),
            role: "down".into(),
            ..ReplicaLine::default()
        };
        if let Ok(s) = status {
            line.id = Some(s.id);
            line.role = if s.leader { "leader" } else { "follower" }.into();
            line.applied = Some(s.applied);
            line.lag = max_applied.map(|m| m.saturating_sub(s.applied));
            if let (Some(dt), Some(old)) = (dt, prev.applied.get(addr)) {
                line.applied_per_s = Some(s.applied.saturating_sub(*old) as f64 / dt);
            }
            prev.applied.insert(addr.clone(), s.applied);
            line.faults = client
                .set_faults(addr, FaultSpec::default())
                .await
                .ok()
                .map(|r| r.dropped + r.delayed + r.timed_out + r.refused);
        }
        if let Some(admin_addr) = admin.get(i) {
            if let Some(text) = fetch_metrics(admin_addr, tls, timeout).await {
                let (ops, buckets) = parse_metrics(&text);
                if let (Some(dt), Some(old)) = (dt, prev.ops.get(addr)) {
                    line.ops_per_s = Some((ops - old).max(0.0) / dt);
                }
                if let Some(old) = prev.buckets.get(addr) {
                    line.p99_ms = p99_ms(&buckets, old);
                }
                prev.ops.insert(addr.clone(), ops);
                prev.buckets.insert(addr.clone(), buckets);
            }
        }
        lines.push(line);
    }
    prev.at = Some(now);
    let leader = lines
        .iter()
        .find(|l| l.role == "leader")
        .and_then(|l| l.id)
        .map_or("none".to_string(), |id| id.to_string());
    View {
        title: format!(
            " kvpaxos: {} replicas, {} up, leader {leader} (q quits) ",
            lines.len(),
            lines.iter().filter(|l| l.role != "down").count()
        ),
        lines,
    }
}

pub(crate) async fn run(settings: Settings, args: TopArgs) -> u8 {
    let (builder, ids) = match settings.builder() {
        Ok(b) => b,
        Err(f) => return Reply::failed(f).emit(settings.format),
    };
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => return Reply::failed(Failure::from_error(e, false)).emit(settings.format),
    };
    let tls = match &settings.tls {
        Some(files) => match kv_api::tls::Tls::load(files).and_then(|t| t.client_config()) {
            Ok(c) => Some(c),
            Err(e) => return Reply::failed(Failure::usage(e.to_string())).emit(settings.format),
        },
        None => None,
    };
    let mut prev = Previous::default();
    let interactive = args.iterations.is_none() && std::io::stdout().is_terminal();
    if !interactive {
        let n = args.iterations.unwrap_or(1).max(1);
        for i in 0..n {
            if i > 0 {
                tokio::time::sleep(args.interval).await;
            }
            let view = sample(
                &client,
                &ids,
                &args.admin,
                tls.as_ref(),
                settings.timeout,
                &mut prev,
            )
            .await;
            print!("{}", text(&view));
        }
        return super::EXIT_OK;
    }
    match interactive_loop(
        &client,
        &ids,
        &args,
        tls.as_ref(),
        settings.timeout,
        &mut prev,
    )
    .await
    {
        Ok(()) => super::EXIT_OK,
        Err(e) => Reply::failed(Failure {
            code: 1,
            kind: "terminal",
            msg: format!("top: the terminal failed: {e}"),
        })
        .emit(settings.format),
    }
}

async fn interactive_loop(
    client: &Client,
    ids: &[Option<u64>],
    args: &TopArgs,
    tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
    timeout: Duration,
    prev: &mut Previous,
) -> std::io::Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
    let mut terminal = ratatui::init();
    let result = async {
        loop {
            let view = sample(client, ids, &args.admin, tls, timeout, prev).await;
            terminal.draw(|f| render(&view, f.area(), f.buffer_mut()))?;
            // Keys are read on a blocking thread, so the runtime's timers
            // keep running meanwhile.
            let interval = args.interval;
            let quit = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
                let deadline = Instant::now() + interval;
                while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                    if event::poll(left)? {
                        if let Event::Key(k) = event::read()? {
                            let ctrl_c = k.code == KeyCode::Char('c')
                                && k.modifiers.contains(KeyModifiers::CONTROL);
                            if k.code == KeyCode::Char('q') || k.code == KeyCode::Esc || ctrl_c {
                                return Ok(true);
                            }
                        }
                    }
                }
                Ok(false)
            })
            .await
            .map_err(std::io::Error::other)??;
            if quit {
                return Ok(());
            }
        }
    }
    .await;
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> View {
        View {
            title: " kvpaxos: 3 replicas, 2 up, leader 1 ".into(),
            lines: vec![
                ReplicaLine {
                    id: Some(1),
                    addr: "127.0.0.1:7001".into(),
                    role: "leader".into(),
                    applied: Some(1234),
                    lag: Some(0),
                    applied_per_s: Some(350.0),
                    ops_per_s: Some(4200.0),
                    p99_ms: Some(1.6),
                    faults: Some(0),
                },
                ReplicaLine {
                    id: Some(2),
                    addr: "127.0.0.1:7002".into(),
                    role: "follower".into(),
                    applied: Some(1200),
                    lag: Some(34),
                    ..ReplicaLine::default()
                },
                ReplicaLine {
                    id: Some(3),
                    addr: "127.0.0.1:7003".into(),
                    role: "down".into(),
                    ..ReplicaLine::default()
                },
            ],
        }
    }

    #[test]
    fn the_table_renders_every_replica_on_a_buffer() {
        let area = Rect::new(0, 0, 100, 7);
        let mut buf = Buffer::empty(area);
        render(&view(), area, &mut buf);
        let rows: Vec<String> = (0..area.height)
            .map(|y| {
                (0..area.width)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect()
            })
            .collect();
        let screen = rows.join("\n");
        assert!(
            rows[0].contains("kvpaxos: 3 replicas, 2 up, leader 1"),
            "{screen}"
        );
        assert!(
            rows[1].contains("applied") && rows[1].contains("p99 ms"),
            "{screen}"
        );
        assert!(
            rows[2].contains("leader") && rows[2].contains("1234"),
            "{screen}"
        );
        assert!(
            rows[2].contains("4200") && rows[2].contains("1.60"),
            "{screen}"
        );
        assert!(
            rows[3].contains("follower") && rows[3].contains("34"),
            "{screen}"
        );
        assert!(rows[4].contains("down"), "{screen}");
    }

    #[test]
    fn text_output_has_a_line_per_replica() {
        let t = text(&view());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert!(lines[2].starts_with("1 ") && lines[2].contains("leader"));
    }

    #[test]
    fn p99_comes_from_the_histogram_between_two_samples() {
        let page = |fast: f64, slow: f64| {
            format!(
                "kvpaxos_client_requests_total{{op=\"put\",outcome=\"ok\"}} {}\n\
                 kvpaxos_client_request_duration_seconds_bucket{{le=\"0.001\",op=\"put\"}} {fast}\n\
                 kvpaxos_client_request_duration_seconds_bucket{{le=\"0.01\",op=\"put\"}} {}\n\
                 kvpaxos_client_request_duration_seconds_bucket{{le=\"+Inf\",op=\"put\"}} {}\n",
                fast + slow,
                fast + slow,
                fast + slow
            )
        };
        let (ops0, b0) = parse_metrics(&page(100.0, 0.0));
        let (ops1, b1) = parse_metrics(&page(1090.0, 10.0));
        assert_eq!(ops1 - ops0, 1000.0);
        // 990 fast, 10 slow of 1000: the 99th percentile is still fast.
        assert_eq!(p99_ms(&b1, &b0), Some(1.0));
        let (_, b2) = parse_metrics(&page(1090.0, 100.0));
        assert_eq!(p99_ms(&b2, &b1), Some(10.0));
    }
}
