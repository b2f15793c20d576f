//! Markdown tables and SVG charts for the throughput bench.

use std::fmt::Write as _;

use crate::workloads::Workload;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imp {
    Pgbench,
    Hand,
    /// Hand-written, with a connection checked out of a deadpool `Pool` per transaction.
    HandPool,
    Rowlock,
}

impl Imp {
    pub const ALL: [Imp; 4] = [Imp::Pgbench, Imp::Hand, Imp::HandPool, Imp::Rowlock];

    pub fn name(self) -> &'static str {
        match self {
            Imp::Pgbench => "pgbench",
            Imp::Hand => "hand-written",
            Imp::HandPool => "hand-pooled",
            Imp::Rowlock => "rowlock",
        }
    }

    fn color(self) -> &'static str {
        match self {
            Imp::Pgbench => "#888888",
            Imp::Hand => "#1f77b4",
            Imp::HandPool => "#2ca02c",
            Imp::Rowlock => "#d62728",
        }
    }
}

/// One timed run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measure {
    pub tps: f64,
    pub rows_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU time of the client thread per transaction (in-process implementations only).
    pub client_cpu_us: f64,
    /// Heap allocations per transaction, in this process (in-process implementations only).
    pub allocs_per_tx: f64,
}

impl Measure {
    /// An implementation that cannot run the workload: shown as "—".
    pub fn missing() -> Measure {
        Measure {
            tps: f64::NAN,
            rows_per_s: f64::NAN,
            p50_ms: f64::NAN,
            p99_ms: f64::NAN,
            client_cpu_us: f64::NAN,
            allocs_per_tx: f64::NAN,
        }
    }
}

/// A number with `decimals` decimals, or "—" when not measured.
fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "—".to_string()
    }
}

/// All rounds of one (workload, clients) cell: `runs[imp][round]`.
pub struct Cell {
    pub workload: Workload,
    pub clients: usize,
    pub runs: [Vec<Measure>; 4],
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl Cell {
    fn runs(&self, imp: Imp) -> &Vec<Measure> {
        &self.runs[imp as usize]
    }

    pub fn median_of(&self, imp: Imp, f: impl Fn(&Measure) -> f64) -> f64 {
        median(self.runs(imp).iter().map(f).collect())
    }

    /// Median of the per-round ratios rowlock / `other` (tps, or rows/s for claims).
    pub fn ratio(&self, other: Imp) -> f64 {
        let metric = |m: &Measure| {
            if self.workload.is_claim() {
                m.rows_per_s
            } else {
                m.tps
            }
        };
        median(
            self.runs(Imp::Rowlock)
                .iter()
                .zip(self.runs(other))
                .map(|(r, o)| metric(r) / metric(o))
                .collect(),
        )
    }
}

pub fn table(workload: Workload, cells: &[&Cell]) -> String {
    let mut out = String::new();
    let unit = if workload.is_claim() { "jobs/s" } else { "tps" };
    let _ = writeln!(out, "### {}\n", workload.name());
    let _ = writeln!(
        out,
        "| clients | pgbench {unit} | hand-written {unit} | hand-pooled {unit} | rowlock {unit} | rowlock / pgbench | rowlock / hand-written | rowlock / hand-pooled | allocs/tx hand-written / hand-pooled / rowlock | client CPU µs/tx hand-written / hand-pooled / rowlock (rowlock / hand-written) | p50 / p99 ms: pgbench | hand-written | rowlock |"
    );
    let _ = writeln!(
        out,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for cell in cells {
        let metric = |imp: Imp| {
            cell.median_of(imp, |m| {
                if workload.is_claim() {
                    m.rows_per_s
                } else {
                    m.tps
                }
            })
        };
        let lat = |imp: Imp| {
            format!(
                "{} / {}",
                num(cell.median_of(imp, |m| m.p50_ms), 2),
                num(cell.median_of(imp, |m| m.p99_ms), 2)
            )
        };
        let allocs = |imp: Imp| num(cell.median_of(imp, |m| m.allocs_per_tx), 1);
        let cpu = |imp: Imp| cell.median_of(imp, |m| m.client_cpu_us);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} / {} / {} ({}) | {} | {} | {} |",
            cell.clients,
            num(metric(Imp::Pgbench), 0),
            num(metric(Imp::Hand), 0),
            num(metric(Imp::HandPool), 0),
            num(metric(Imp::Rowlock), 0),
            num(cell.ratio(Imp::Pgbench), 2),
            num(cell.ratio(Imp::Hand), 2),
            num(cell.ratio(Imp::HandPool), 2),
            allocs(Imp::Hand),
            allocs(Imp::HandPool),
            allocs(Imp::Rowlock),
            num(cpu(Imp::Hand), 1),
            num(cpu(Imp::HandPool), 1),
            num(cpu(Imp::Rowlock), 1),
            num(cpu(Imp::Rowlock) / cpu(Imp::Hand), 2),
            lat(Imp::Pgbench),
            lat(Imp::Hand),
            lat(Imp::Rowlock),
        );
    }
    out
}

/// A line chart: throughput against client count, one line per implementation.
pub fn svg(workload: Workload, cells: &[&Cell]) -> String {
    let (w, h, left, right, top, bottom) = (560.0, 320.0, 70.0, 150.0, 40.0, 50.0);
    let metric = |m: &Measure| {
        if workload.is_claim() {
            m.rows_per_s
        } else {
            m.tps
        }
    };
    let series: Vec<(Imp, Vec<f64>)> = Imp::ALL
        .iter()
        .map(|&imp| {
            (
                imp,
                cells.iter().map(|c| c.median_of(imp, metric)).collect(),
            )
        })
        .collect();
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(1.0_f64, f64::max)
        * 1.1;
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let x = |i: usize| left + plot_w * (i as f64 + 0.5) / cells.len() as f64;
    let y = |v: f64| top + plot_h * (1.0 - v / max);
    let unit = if workload.is_claim() {
        "jobs/s"
    } else {
        "transactions/s"
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="22" font-size="15">{} — {unit} by client count</text>"#,
        workload.name()
    );
    for k in 0..=4 {
        let v = max * k as f64 / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
            left + plot_w,
            left - 6.0,
            y(v) + 4.0,
            yy = y(v),
        );
    }
    for (i, c) in cells.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            x(i),
            top + plot_h + 18.0,
            c.clients
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">clients</text>"#,
        left + plot_w / 2.0,
        h - 8.0
    );
    for (n, (imp, values)) in series.iter().enumerate() {
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2.5" points="{}"/>"#,
            imp.color(),
            points.join(" ")
        );
        for p in &points {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                s,
                r#"<circle cx="{px}" cy="{py}" r="3.5" fill="{}"/>"#,
                imp.color()
            );
        }
        let ly = top + 20.0 + n as f64 * 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="2.5"/><text x="{}" y="{}">{}</text>"#,
            w - right + 15.0,
            w - right + 40.0,
            imp.color(),
            w - right + 46.0,
            ly + 4.0,
            imp.name()
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The performance targets, computed from this run's cells (medians over rounds).
pub fn targets(cells: &[Cell]) -> String {
    let cell = |w: Workload, clients: usize| {
        cells
            .iter()
            .find(|c| c.workload == w && c.clients == clients)
    };
    let rows = |c: &Cell, imp: Imp| c.median_of(imp, |m| m.rows_per_s);
    let mut lines = Vec::new();
    let mut worst: Option<(f64, String)> = None;
    for c in cells {
        for other in [Imp::Hand, Imp::HandPool] {
            let r = c.ratio(other);
            if r.is_finite() && worst.as_ref().is_none_or(|(w, _)| r < *w) {
                worst = Some((
                    r,
                    format!(
                        "{} at {} clients, vs {}",
                        c.workload.name(),
                        c.clients,
                        other.name()
                    ),
                ));
            }
        }
    }
    if let Some((r, at)) = worst {
        lines.push(format!(
            "| rowlock ≥ 0.97× hand-written on every workload and client count | lowest {r:.2} ({at}) | {} |",
            if r >= 0.97 { "met" } else { "missed" }
        ));
    }
    // The client's own cost, steadier than throughput on a loaded machine.
    let mut cpu_worst: Option<(f64, String)> = None;
    let mut alloc_worst: Option<(f64, String)> = None;
    for c in cells {
        let at = format!("{} at {} clients", c.workload.name(), c.clients);
        let cpu = c.median_of(Imp::Rowlock, |m| m.client_cpu_us)
            / c.median_of(Imp::Hand, |m| m.client_cpu_us);
        if cpu.is_finite() && cpu_worst.as_ref().is_none_or(|(w, _)| cpu > *w) {
            cpu_worst = Some((cpu, at.clone()));
        }
        let extra = c.median_of(Imp::Rowlock, |m| m.allocs_per_tx)
            - c.median_of(Imp::Hand, |m| m.allocs_per_tx);
        if extra.is_finite() && alloc_worst.as_ref().is_none_or(|(w, _)| extra > *w) {
            alloc_worst = Some((extra, at));
        }
    }
    if let Some((r, at)) = cpu_worst {
        lines.push(format!(
            "| rowlock client CPU per transaction ≤ 1.05× hand-written on every workload | highest {r:.2} ({at}) | {} |",
            if r <= 1.05 { "met" } else { "missed" }
        ));
    }
    if let Some((extra, at)) = alloc_worst {
        lines.push(format!(
            "| rowlock allocations per transaction within 2 of hand-written on every workload | most {extra:+.1} ({at}) | {} |",
            if extra <= 2.0 { "met" } else { "missed" }
        ));
    }
    if let (Some(cas), Some(lock)) = (cell(Workload::AcceptCas, 1), cell(Workload::Accept, 1)) {
        let r = median(
            cas.runs[Imp::Rowlock as usize]
                .iter()
                .zip(&lock.runs[Imp::Pgbench as usize])
                .map(|(a, b)| a.tps / b.tps)
                .collect(),
        );
        lines.push(format!(
            "| accept_cas (rowlock) ≥ 2.0× pgbench's accept lock script, 1 client | {r:.2} | {} |",
            if r >= 2.0 { "met" } else { "missed" }
        ));
    }
    for (clients, target) in [(1, 1.3), (16, 1.0)] {
        if let Some(c) = cell(Workload::ClaimOne, clients) {
            let r = c.ratio(Imp::Pgbench);
            lines.push(format!(
                "| claim_one ≥ {target}× pgbench, {clients} client(s) | {r:.2} | {} |",
                if r >= target { "met" } else { "missed" }
            ));
        }
    }
    for batch_workload in [Workload::ClaimBatch, Workload::ClaimSpread] {
        let (Some(batch), Some(one)) = (cell(batch_workload, 16), cell(Workload::ClaimOne, 16))
        else {
            continue;
        };
        for imp in [Imp::Pgbench, Imp::Hand, Imp::Rowlock] {
            let r = rows(batch, imp) / rows(one, imp);
            lines.push(format!(
                "| {} ≥ 10× claim_one jobs/s, 16 clients ({}) | {r:.1}× | {} |",
                batch_workload.name(),
                imp.name(),
                if r >= 10.0 { "met" } else { "missed" }
            ));
        }
    }
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "### Targets\n\n| target | this run | |\n|---|---:|---|\n{}\n\n",
        lines.join("\n")
    )
}
