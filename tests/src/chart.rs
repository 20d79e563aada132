//! The report's chart: each headline comparison as one bar, "how many times better ours is
//! than the peer" (1.0 = even), drawn as SVG and turned into PNG by `rsvg-convert`
//! (librsvg2-bin, which `make deps` installs).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

/// One comparison: `value` > 1 means ours is better; `target` is the least we aim for.
#[derive(Debug, Clone)]
pub struct Ratio {
    pub label: String,
    pub value: f64,
    pub target: f64,
}

impl Ratio {
    pub fn new(label: impl Into<String>, value: f64, target: f64) -> Ratio {
        Ratio {
            label: label.into(),
            value,
            target,
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The chart as SVG: bars on a log scale from 1/8x to 64x, a line at 1x, a tick per target.
pub fn svg(ratios: &[Ratio]) -> String {
    const LABEL_W: f64 = 470.0;
    const BAR_W: f64 = 520.0;
    const ROW_H: f64 = 28.0;
    const TOP: f64 = 50.0;
    let (lo, hi) = (1.0f64 / 8.0, 64.0f64);
    let x = |v: f64| {
        let v = v.clamp(lo, hi);
        LABEL_W + (v.log2() - lo.log2()) / (hi.log2() - lo.log2()) * BAR_W
    };
    let height = TOP + ROW_H * ratios.len() as f64 + 40.0;
    let width = LABEL_W + BAR_W + 90.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="24" font-size="16" font-weight="bold">kubevirt-shim vs peers: times better (log scale; 1x = even; | = target)</text>"#
    );
    for (i, r) in ratios.iter().enumerate() {
        let y = TOP + ROW_H * i as f64;
        let color = if r.value >= r.target {
            "#2e7d32"
        } else {
            "#c62828"
        };
        let (x0, x1) = (x(1.0).min(x(r.value)), x(1.0).max(x(r.value)));
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{x0:.1}" y="{}" width="{:.1}" height="{}" fill="{color}"/><line x1="{t:.1}" x2="{t:.1}" y1="{}" y2="{}" stroke="black" stroke-width="2"/><text x="{}" y="{}">{:.2}x</text>"#,
            LABEL_W - 8.0,
            y + 17.0,
            escape(&r.label),
            y + 5.0,
            (x1 - x0).max(1.0),
            ROW_H - 10.0,
            y + 2.0,
            y + ROW_H - 2.0,
            x1 + 6.0,
            y + 17.0,
            r.value,
            t = x(r.target),
        );
    }
    let bottom = TOP + ROW_H * ratios.len() as f64;
    let one = x(1.0);
    let _ = writeln!(
        s,
        r#"<line x1="{one:.1}" x2="{one:.1}" y1="{}" y2="{bottom}" stroke="gray" stroke-dasharray="4"/>"#,
        TOP - 6.0
    );
    for v in [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0] {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle" fill="gray">{v}x</text>"#,
            x(v),
            bottom + 20.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Writes `<stem>.svg` and `<stem>.png`; an error says what is missing.
pub fn write(ratios: &[Ratio], dir: &Path, stem: &str) -> Result<(), String> {
    let svg_path = dir.join(format!("{stem}.svg"));
    let png_path = dir.join(format!("{stem}.png"));
    std::fs::write(&svg_path, svg(ratios)).map_err(|e| format!("{}: {e}", svg_path.display()))?;
    let out = Command::new("rsvg-convert")
        .arg("-o")
        .arg(&png_path)
        .arg(&svg_path)
        .output()
        .map_err(|e| format!("rsvg-convert (apt-get install librsvg2-bin): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "rsvg-convert: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_has_a_bar_per_ratio_and_escapes_labels() {
        let svg = svg(&[Ratio::new("a <b>", 2.0, 1.0), Ratio::new("c", 0.5, 1.0)]);
        assert_eq!(svg.matches("<rect x=").count(), 2);
        assert!(svg.contains("a &lt;b&gt;") && svg.contains("2.00x") && svg.contains("0.50x"));
        assert!(svg.contains("#2e7d32") && svg.contains("#c62828"));
    }
}
