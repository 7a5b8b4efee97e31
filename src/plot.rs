//! The one SVG plotting module: a page with a title, axes, lines, points,
//! bars and labels, written as plain SVG text. `kiln bench`, `kiln plan`
//! and `kiln drift` draw with it.

use std::fmt::Write;

/// An SVG page being drawn.
pub struct Svg {
    out: String,
}

/// Text safe inside SVG.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

impl Svg {
    /// A white page of `width` × `height` with `title` at (`title_x`, 18..20).
    pub fn page(width: f64, height: f64, font_size: u32, title_x: f64, title_y: f64, title: &str) -> Self {
        let out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" \
             font-size=\"{font_size}\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{title_x}\" y=\"{title_y}\" font-size=\"14\">{title}</text>\n"
        );
        Self { out }
    }

    /// Axes from (`x`, `bottom`) to the right by `width` and up to `top`,
    /// with labels and the maximum of each.
    #[allow(clippy::too_many_arguments)]
    pub fn axes(
        &mut self,
        x: f64,
        top: f64,
        width: f64,
        bottom: f64,
        x_label: &str,
        y_label: &str,
        x_max: f64,
        y_max: f64,
    ) {
        let _ = writeln!(
            self.out,
            "<line x1=\"{x}\" y1=\"{bottom}\" x2=\"{}\" y2=\"{bottom}\" stroke=\"black\"/>\
             <line x1=\"{x}\" y1=\"{top}\" x2=\"{x}\" y2=\"{bottom}\" stroke=\"black\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 {} {})\">{y_label}</text>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{x_max:.0}</text>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y_max:.1}</text>",
            x + width,
            x + width / 2.0,
            bottom + 30.0,
            x - 40.0,
            (top + bottom) / 2.0,
            x - 40.0,
            (top + bottom) / 2.0,
            x + width,
            bottom + 15.0,
            x - 4.0,
            top + 4.0,
        );
    }

    /// A line through `points` (already in page coordinates).
    pub fn polyline(&mut self, points: &[(f64, f64)], colour: &str) {
        let pts: Vec<String> = points.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(
            self.out,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        );
    }

    /// A dot, with an optional label beside it.
    pub fn point(&mut self, (x, y): (f64, f64), colour: &str, label: Option<&str>) {
        let _ = write!(self.out, "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{colour}\"/>");
        if let Some(label) = label {
            let _ = write!(self.out, "<text x=\"{x:.1}\" y=\"{y:.1}\" dx=\"5\" dy=\"-5\">{label}</text>");
        }
        self.out.push('\n');
    }

    /// A filled rectangle (a bar).
    pub fn bar(&mut self, x: f64, y: f64, width: f64, height: f64, colour: &str) {
        let _ = writeln!(
            self.out,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{width:.1}\" height=\"{height:.1}\" fill=\"{colour}\"/>"
        );
    }

    /// A straight line; `dashed` for reference lines such as a budget.
    pub fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), colour: &str, dashed: bool) {
        let dash = if dashed { " stroke-dasharray=\"4 3\"" } else { "" };
        let _ = writeln!(
            self.out,
            "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{colour}\"{dash}/>"
        );
    }

    /// Text at (`x`, `y`), in `colour` when given.
    pub fn text(&mut self, (x, y): (f64, f64), text: &str, colour: Option<&str>) {
        let fill = colour.map(|c| format!(" fill=\"{c}\"")).unwrap_or_default();
        let _ = writeln!(self.out, "<text x=\"{x:.1}\" y=\"{y:.1}\"{fill}>{text}</text>");
    }

    /// The finished SVG document.
    pub fn finish(mut self) -> String {
        self.out.push_str("</svg>\n");
        self.out
    }
}

/// A single-series line chart with an optional horizontal line (a budget).
/// An overloaded point (infinite y) is drawn at the top edge.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, points: &[(f64, f64)], hline: Option<f64>) -> String {
    let (w, h, pad, top) = (640.0, 400.0, 70.0, 40.0);
    let (right, bottom) = (w - 20.0, h - 50.0);
    let x_max = points.iter().map(|p| p.0).fold(1e-9, f64::max) * 1.05;
    let y_max = points.iter().map(|p| p.1).filter(|y| y.is_finite()).chain(hline).fold(1e-9, f64::max) * 1.1;
    let x_of = |x: f64| pad + x / x_max * (right - pad);
    let y_of = |y: f64| {
        let shown = if y.is_finite() { y.min(y_max) } else { y_max };
        bottom - shown / y_max * (bottom - top)
    };
    let mut svg = Svg::page(w, h, 12, pad, 20.0, title);
    svg.axes(pad, top, right - pad, bottom, x_label, y_label, x_max, y_max);
    if let Some(y) = hline {
        svg.line((pad, y_of(y)), (right, y_of(y)), "#999", true);
    }
    let page: Vec<(f64, f64)> = points.iter().map(|(x, y)| (x_of(*x), y_of(*y))).collect();
    svg.polyline(&page, "#2980b9");
    for p in &page {
        svg.point(*p, "#2980b9", None);
    }
    svg.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overloaded_point_does_not_break_the_chart() {
        let svg = line_chart("t", "x", "y", &[(1.0, 2.0), (2.0, f64::INFINITY)], Some(3.0));
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(escape("a<b & c>"), "a&lt;b &amp; c&gt;");
    }
}
