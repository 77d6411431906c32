//! The chart: completion-time CDF per scenario (left) and origin egress per scenario as a
//! multiple of the image size (right). Plain SVG written by hand: two small panels do not need
//! a plotting library, and the file diffs and renders on GitHub as is.

use std::fmt::Write as _;

use super::report::Report;

const W: f64 = 960.0;
const H: f64 = 420.0;
const COLORS: [&str; 3] = ["#d62728", "#1f77b4", "#2ca02c"];

/// A "nice" axis maximum and tick step covering `max`.
fn nice_axis(max: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Renders the report's chart.
pub fn render(report: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let title = format!(
        "Shoal rollout: {} nodes, {:.0} MiB image, origin {}, node {} ({}, {})",
        report.nodes,
        report.image_bytes as f64 / 1048576.0,
        report.origin_rate_bps.map_or("unshaped".into(), |r| super::net::Rate(r).to_string()),
        report.node_rate_bps.map_or("unshaped".into(), |r| super::net::Rate(r).to_string()),
        report.mode,
        &report.date[..10.min(report.date.len())],
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
        W / 2.0,
        esc(&title)
    );
    let ran: Vec<(usize, &super::report::ScenarioResult)> =
        report.scenarios.iter().enumerate().filter(|(_, sc)| sc.skipped.is_none()).collect();

    // Left: CDF of completion times, all runs pooled.
    let (x0, y0, pw, ph) = (60.0, 50.0, 520.0, 310.0);
    let t_max = ran
        .iter()
        .flat_map(|(_, sc)| sc.runs.iter().flat_map(|r| r.node_seconds.iter().flatten()))
        .copied()
        .chain(report.t_min_s)
        .fold(0.0, f64::max);
    let (x_max, x_step) = nice_axis(t_max);
    let px = |t: f64| x0 + t / x_max * pw;
    let py = |f: f64| y0 + ph - f * ph;
    axes(&mut s, x0, y0, pw, ph);
    let mut t = 0.0;
    while t <= x_max + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#eee"/><text x="{0:.1}" y="{3:.1}" text-anchor="middle">{4}</text>"##,
            px(t),
            y0,
            y0 + ph,
            y0 + ph + 16.0,
            t
        );
        t += x_step;
    }
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let _ =
            writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#, x0 - 6.0, py(f) + 4.0, f);
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">completion time (s)</text>"#,
        x0 + pw / 2.0,
        y0 + ph + 34.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle">fraction of nodes done</text>"#,
        x0 - 40.0,
        y0 + ph / 2.0
    );
    if let Some(tm) = report.t_min_s {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#555" stroke-dasharray="5,4"/><text x="{3:.1}" y="{4:.1}" fill="#555">T_min {5:.1} s</text>"##,
            px(tm),
            y0,
            y0 + ph,
            px(tm) + 4.0,
            y0 + 12.0,
            tm
        );
    }
    for (slot, (k, sc)) in ran.iter().enumerate() {
        let color = COLORS[*k % COLORS.len()];
        let mut times: Vec<f64> =
            sc.runs.iter().flat_map(|r| r.node_seconds.iter().flatten()).copied().collect();
        times.sort_by(|a, b| a.total_cmp(b));
        let total = sc.pulls.max(1) as f64;
        let mut d = format!("M{:.1},{:.1}", px(0.0), py(0.0));
        for (i, t) in times.iter().enumerate() {
            let _ = write!(d, " H{:.1} V{:.1}", px(*t), py((i + 1) as f64 / total));
        }
        let _ = writeln!(s, r#"<path d="{d}" fill="none" stroke="{color}" stroke-width="2"/>"#);
        let ly = y0 + ph - 12.0 - (ran.len() - slot) as f64 * 18.0;
        let label = format!("{} ({}/{} done)", sc.scenario.name(), sc.completed, sc.pulls);
        let _ = writeln!(
            s,
            r#"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="{color}" stroke-width="2"/><text x="{3:.1}" y="{4:.1}">{5}</text>"#,
            x0 + pw - 170.0,
            ly,
            x0 + pw - 150.0,
            x0 + pw - 145.0,
            ly + 4.0,
            esc(&label)
        );
    }

    // Right: origin egress / image bytes per scenario.
    let (bx0, by0, bw, bh) = (680.0, 50.0, 250.0, 310.0);
    let r_max = ran.iter().filter_map(|(_, sc)| sc.egress_ratio).fold(1.0, f64::max);
    let (y_max, y_step) = nice_axis(r_max * 1.1);
    let by = |r: f64| by0 + bh - r / y_max * bh;
    axes(&mut s, bx0, by0, bw, bh);
    let mut r = 0.0;
    while r <= y_max + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="#eee"/><text x="{3:.1}" y="{4:.1}" text-anchor="end">{5}</text>"##,
            bx0,
            by(r),
            bx0 + bw,
            bx0 - 6.0,
            by(r) + 4.0,
            r
        );
        r += y_step;
    }
    let _ = writeln!(
        s,
        r##"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="#555" stroke-dasharray="5,4"/>"##,
        bx0,
        by(1.0),
        bx0 + bw
    );
    let slot_w = bw / ran.len().max(1) as f64;
    for (slot, (k, sc)) in ran.iter().enumerate() {
        let color = COLORS[*k % COLORS.len()];
        let ratio = sc.egress_ratio.unwrap_or(0.0);
        let x = bx0 + slot as f64 * slot_w + slot_w * 0.2;
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{ratio:.2}×</text><text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            by(ratio),
            slot_w * 0.6,
            by0 + bh - by(ratio),
            x + slot_w * 0.3,
            by(ratio) - 5.0,
            x + slot_w * 0.3,
            by0 + bh + 16.0,
            sc.scenario.name()
        );
    }
    let _ = writeln!(
        s,
        r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle">origin egress / image bytes</text>"#,
        bx0 - 40.0,
        by0 + bh / 2.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"#,
        W / 2.0,
        H - 12.0,
        esc(&format!(
            "origin egress: {}; medians of {} run(s); {} client",
            if report.mode == "netns" { "tx bytes of the origin's interface" } else { "origin access log" },
            report.runs_per_scenario,
            report.client
        ))
    );
    s.push_str("</svg>\n");
    s
}

fn axes(s: &mut String, x0: f64, y0: f64, w: f64, h: f64) {
    let _ = writeln!(
        s,
        r##"<path d="M{x0:.1},{y0:.1} V{:.1} H{:.1}" fill="none" stroke="#333"/>"##,
        y0 + h,
        x0 + w
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_round() {
        assert_eq!(nice_axis(47.0), (50.0, 10.0));
        assert_eq!(nice_axis(1.1), (1.25, 0.25));
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
    }
}
