//! Charts for supportlm's reports, each written as `NAME.svg` and `NAME.png` (plotters; the DejaVu Sans
//! font is embedded, so no system font is needed).
//!
//! - [`line_chart`]: loss curves and learning curves.
//! - [`heatmap`]: confusion matrices.
//! - [`bar_chart`]: per-class scores of several methods; [`bar_chart_with_intervals`] with a whisker per
//!   bar (a metric with its 95% interval per method).

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {message}")]
/// A chart could not be drawn or written.
pub struct PlotError {
    /// The file being written.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, PlotError>;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Registering an embedded, valid font cannot fail in practice; if it did, text would be skipped.
        let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn err(path: &Path, e: impl std::fmt::Display) -> PlotError {
    PlotError {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// One named series of `(x, y)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The legend entry.
    pub name: String,
    /// `(x, y)` points in drawing order.
    pub points: Vec<(f64, f64)>,
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Renders the same chart to `base.svg` and `base.png` (the PNG through a temporary file and a rename).
fn render(
    base: &Path,
    size: (u32, u32),
    svg: impl FnOnce(DrawingArea<SVGBackend, Shift>) -> DrawResult<SVGBackend<'static>>,
    png: impl FnOnce(DrawingArea<BitMapBackend, Shift>) -> DrawResult<BitMapBackend<'static>>,
) -> Result<()> {
    font();
    if let Some(dir) = base.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(base, e))?;
    }
    let svg_path = base.with_extension("svg");
    let svg_tmp = base.with_extension("svg.tmp");
    {
        let area = SVGBackend::new(&svg_tmp, size).into_drawing_area();
        svg(area).map_err(|e| err(&svg_path, format!("{e:?}")))?;
    }
    std::fs::rename(&svg_tmp, &svg_path).map_err(|e| err(&svg_path, e))?;
    let png_path = base.with_extension("png");
    let png_tmp = base.with_extension("tmp.png");
    {
        let area = BitMapBackend::new(&png_tmp, size).into_drawing_area();
        png(area).map_err(|e| err(&png_path, format!("{e:?}")))?;
    }
    std::fs::rename(&png_tmp, &png_path).map_err(|e| err(&png_path, e))
}

fn bounds(series: &[Series]) -> ((f64, f64), (f64, f64)) {
    let pts = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| p.0.is_finite() && p.1.is_finite())
    };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return ((0.0, 1.0), (0.0, 1.0));
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    let xpad = if x1 > x0 { 0.0 } else { 1.0 };
    ((x0 - xpad, x1 + xpad), (y0 - pad, y1 + pad))
}

fn draw_lines<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> DrawResult<DB> {
    area.fill(&WHITE)?;
    let ((x0, x1), (y0, y1)) = bounds(series);
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    area.present()
}

/// A line chart (e.g. train and validation loss against the step).
pub fn line_chart(
    base: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    render(
        base,
        (900, 520),
        |a| draw_lines(a, title, x_label, y_label, series),
        |a| draw_lines(a, title, x_label, y_label, series),
    )
}

fn draw_heatmap<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    title: &str,
    labels: &[String],
    counts: &[Vec<usize>],
) -> DrawResult<DB> {
    area.fill(&WHITE)?;
    let n = labels.len().max(1);
    let max = counts.iter().flatten().copied().max().unwrap_or(0).max(1) as f64;
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(4) as u32;
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(20 + 8 * longest)
        .y_label_area_size(20 + 8 * longest)
        .build_cartesian_2d((0..n - 1).into_segmented(), (0..n - 1).into_segmented())?;
    let name = |v: &SegmentValue<usize>, flip: bool| match v {
        SegmentValue::CenterOf(i) if *i < n => labels[if flip { n - 1 - i } else { *i }].clone(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(n)
        .y_labels(n)
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&|v| name(v, true))
        .x_desc("predicted")
        .y_desc("true")
        .label_style(("sans-serif", 12))
        .draw()?;
    // Column labels drawn by hand, reading upwards and ending just under the axis.
    let style = ("sans-serif", 12)
        .into_font()
        .transform(FontTransform::Rotate270)
        .into_text_style(&area)
        .pos(Pos::new(HPos::Right, VPos::Center));
    for p in 0..n {
        let (x, y) = chart.backend_coord(&(SegmentValue::CenterOf(p), SegmentValue::Exact(0)));
        area.draw(&Text::new(
            name(&SegmentValue::CenterOf(p), false),
            (x, y + 8),
            style.clone(),
        ))?;
    }
    for (t, row) in counts.iter().enumerate() {
        for (p, &c) in row.iter().enumerate() {
            let shade = c as f64 / max;
            let color = RGBColor(
                (255.0 * (1.0 - 0.8 * shade)) as u8,
                (255.0 * (1.0 - 0.55 * shade)) as u8,
                255,
            );
            let y = n - 1 - t;
            chart.draw_series(std::iter::once(Rectangle::new(
                [
                    (SegmentValue::Exact(p), SegmentValue::Exact(y)),
                    (SegmentValue::Exact(p + 1), SegmentValue::Exact(y + 1)),
                ],
                color.filled(),
            )))?;
            if c > 0 {
                let text_color = if shade > 0.6 { WHITE } else { BLACK };
                let style = ("sans-serif", 12)
                    .into_font()
                    .color(&text_color)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                chart.draw_series(std::iter::once(Text::new(
                    c.to_string(),
                    (SegmentValue::CenterOf(p), SegmentValue::CenterOf(y)),
                    style,
                )))?;
            }
        }
    }
    area.present()
}

/// A confusion-matrix heatmap: rows true labels, columns predicted labels.
pub fn heatmap(base: &Path, title: &str, labels: &[String], counts: &[Vec<usize>]) -> Result<()> {
    let side = (260 + 44 * labels.len()) as u32;
    render(
        base,
        (side, side),
        |a| draw_heatmap(a, title, labels, counts),
        |a| draw_heatmap(a, title, labels, counts),
    )
}

/// A bar's interval `(low, high)`, drawn as a whisker; `None` draws none.
type Whiskers<'a> = Option<&'a [Vec<Option<(f64, f64)>>]>;

fn draw_bars<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
    whiskers: Whiskers,
) -> DrawResult<DB> {
    area.fill(&WHITE)?;
    let n = categories.len().max(1);
    let k = series.len().max(1);
    let highs = whiskers
        .into_iter()
        .flatten()
        .flatten()
        .flatten()
        .map(|&(_, h)| h);
    let max = series
        .iter()
        .flat_map(|s| s.1.iter())
        .copied()
        .chain(highs)
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.05;
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(110)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n as f64, 0.0..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_label)
        .draw()?;
    // One label under each group's centre (the mesh's own x labels fall on round numbers, which
    // skipped every other category).
    let label_style = ("sans-serif", 12)
        .into_font()
        .transform(FontTransform::Rotate90)
        .color(&BLACK);
    for (i, category) in categories.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        area.draw(&Text::new(
            category.clone(),
            (x + 6, y + 8),
            label_style.clone(),
        ))?;
    }
    let width = 0.8 / k as f64;
    for (si, (name, values)) in series.iter().enumerate() {
        let color = PALETTE[si % PALETTE.len()];
        chart
            .draw_series(values.iter().enumerate().map(|(i, &v)| {
                let x0 = i as f64 + 0.1 + si as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, v)], color.filled())
            }))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        if let Some(bars) = whiskers.and_then(|w| w.get(si)) {
            chart.draw_series(bars.iter().enumerate().filter_map(|(i, w)| {
                let (low, high) = (*w)?;
                let x = i as f64 + 0.1 + (si as f64 + 0.5) * width;
                let cap = width / 4.0;
                Some(PathElement::new(
                    vec![
                        (x - cap, low),
                        (x + cap, low),
                        (x, low),
                        (x, high),
                        (x - cap, high),
                        (x + cap, high),
                    ],
                    BLACK.stroke_width(2),
                ))
            }))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    area.present()
}

/// Grouped bars: one group per category, one bar per series (e.g. per-class F1 of each method).
pub fn bar_chart(
    base: &Path,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    render(
        base,
        (1000, 560),
        |a| draw_bars(a, title, y_label, categories, series, None),
        |a| draw_bars(a, title, y_label, categories, series, None),
    )
}

/// [`bar_chart`] with an interval per bar (`whiskers[series][category]`, `None` for none), drawn as
/// a whisker with caps (e.g. a metric with its 95% interval per method).
pub fn bar_chart_with_intervals(
    base: &Path,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
    whiskers: &[Vec<Option<(f64, f64)>>],
) -> Result<()> {
    render(
        base,
        (1000, 560),
        |a| draw_bars(a, title, y_label, categories, series, Some(whiskers)),
        |a| draw_bars(a, title, y_label, categories, series, Some(whiskers)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_written_as_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let s = vec![
            Series {
                name: "train".into(),
                points: vec![(1.0, 3.0), (2.0, 2.0), (3.0, 1.5)],
            },
            Series {
                name: "validation".into(),
                points: vec![(0.0, 4.0), (3.0, 1.8)],
            },
        ];
        line_chart(&dir.path().join("loss"), "Loss", "step", "loss", &s).unwrap();
        let labels: Vec<String> = ["A", "B", "C"].iter().map(|s| s.to_string()).collect();
        heatmap(
            &dir.path().join("cm"),
            "Confusion",
            &labels,
            &[vec![5, 1, 0], vec![0, 3, 2], vec![1, 0, 7]],
        )
        .unwrap();
        bar_chart(
            &dir.path().join("f1"),
            "F1",
            "F1",
            &labels,
            &[("a".into(), vec![0.5, 0.7, 0.9])],
        )
        .unwrap();
        bar_chart_with_intervals(
            &dir.path().join("ci"),
            "Macro-F1",
            "score",
            &labels,
            &[("a".into(), vec![0.5, 0.7, 0.9])],
            &[vec![Some((0.4, 0.6)), None, Some((0.85, 1.2))]],
        )
        .unwrap();
        for name in ["loss", "cm", "f1", "ci"] {
            let svg = std::fs::read_to_string(dir.path().join(format!("{name}.svg"))).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("</svg>"));
            let png = std::fs::read(dir.path().join(format!("{name}.png"))).unwrap();
            assert_eq!(&png[1..4], b"PNG");
        }
        let svg = std::fs::read_to_string(dir.path().join("loss.svg")).unwrap();
        assert!(svg.contains("validation"), "legend text is in the SVG");
    }
}
