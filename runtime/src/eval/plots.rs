//! The three SVG plots of an evaluation report (accuracy by arm, accuracy by round, tokens against
//! accuracy), drawn from a [`Summary`] alone.
//!
//! Text is written as SVG `<text>` elements and laid out with plotters' built-in size estimate, so
//! no font files or font libraries are needed; the viewer picks a sans-serif font. An empty
//! summary still gives three valid files, each with a caption saying why there is no plot.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::record::Arm;
use super::summary::{ArmSummary, Summary};

/// The folder, next to the report, the plots are written to by convention (the report links to
/// `plots/<file>`).
pub const PLOTS_DIR: &str = "plots";
/// Accuracy by arm, with ±1 standard error bars.
pub const ACCURACY_FILE: &str = "accuracy.svg";
/// Accuracy after each round, one line per arm with round data.
pub const ROUNDS_FILE: &str = "rounds.svg";
/// Mean tokens per run against accuracy, one point per arm.
pub const TOKENS_FILE: &str = "tokens.svg";

/// Pixel size of every plot.
const SIZE: (u32, u32) = (800, 500);

/// What plotters reports when drawing to an SVG file fails.
pub type DrawError = DrawingAreaErrorKind<std::io::Error>;

/// Why the plots could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The output folder could not be created.
    #[error("cannot create plot directory {}: {source}", dir.display())]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Drawing or writing one plot file failed.
    #[error("cannot draw {}: {source}", path.display())]
    Draw {
        path: PathBuf,
        #[source]
        source: DrawError,
    },
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type DrawFn = fn(&Summary, &Area<'_>) -> Result<(), DrawError>;

/// Writes `accuracy.svg`, `rounds.svg` and `tokens.svg` into `dir` (created if missing) and
/// returns their paths in that order. Arms without an accuracy are left out of every plot.
pub fn write_plots(summary: &Summary, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    std::fs::create_dir_all(dir).map_err(|source| PlotError::CreateDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let plots: [(&str, DrawFn); 3] = [
        (ACCURACY_FILE, draw_accuracy),
        (ROUNDS_FILE, draw_rounds),
        (TOKENS_FILE, draw_tokens),
    ];
    plots
        .into_iter()
        .map(|(file, draw)| write_one(summary, &dir.join(file), draw))
        .collect()
}

fn write_one(summary: &Summary, path: &Path, draw: DrawFn) -> Result<PathBuf, PlotError> {
    let render = || {
        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        draw(summary, &root)?;
        root.present()
    };
    render().map_err(|source| PlotError::Draw {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(path.to_path_buf())
}

/// One colour per arm, the same in every plot.
fn arm_color(arm: Arm) -> RGBColor {
    match arm {
        Arm::Single => RGBColor(31, 119, 180),
        Arm::SelfRefine => RGBColor(255, 127, 14),
        Arm::Majority => RGBColor(44, 160, 44),
        Arm::Council => RGBColor(214, 39, 40),
    }
}

fn title_font() -> TextStyle<'static> {
    ("sans-serif", 22).into_font().color(&BLACK)
}

fn label_font() -> TextStyle<'static> {
    ("sans-serif", 14).into_font().color(&BLACK)
}

/// An arm with an accuracy; figures in percent.
#[derive(Debug, Clone, Copy)]
struct Scored<'a> {
    arm: &'a ArmSummary,
    accuracy: f64,
    stderr: f64,
}

/// The arms with an accuracy, in summary order.
fn scored_arms(summary: &Summary) -> Vec<Scored<'_>> {
    summary
        .arms
        .iter()
        .filter_map(|arm| {
            let accuracy = arm.accuracy? * 100.0;
            let stderr = arm.stderr.unwrap_or(0.0) * 100.0;
            Some(Scored {
                arm,
                accuracy,
                stderr,
            })
        })
        .collect()
}

/// A plot without data: only its title and the reason.
fn draw_empty(root: &Area<'_>, title: &str, reason: &str) -> Result<(), DrawError> {
    root.titled(&format!("{title}: {reason}"), title_font())?;
    Ok(())
}

/// A categorical axis of `n` equal slots: slot `i` spans `[i, i + 1)` and its centre, where the
/// tick and label go, is `i + 0.5`. (plotters' own discrete axes collapse to one pixel when
/// there is a single category, as with one scored arm or round 0 only.)
#[derive(Debug, Clone, Copy)]
struct Slots(u32);

impl Slots {
    fn of(n: usize) -> Self {
        Slots(u32::try_from(n).unwrap_or(u32::MAX).max(1))
    }

    fn centre(i: usize) -> f64 {
        i as f64 + 0.5
    }

    /// The slot a label position belongs to.
    fn index(value: f64) -> usize {
        value.max(0.0).floor() as usize
    }
}

impl Ranged for Slots {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let share = value / f64::from(self.0);
        limit.0 + (f64::from(limit.1 - limit.0) * share).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        // Only bold points: one labelled tick per slot, no light grid lines between them.
        if hint.weight().allow_light_points() {
            return Vec::new();
        }
        (0..self.0 as usize).map(Slots::centre).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        0.0..f64::from(self.0)
    }
}

/// The common frame: caption, margins, label areas, a 0–100 % y axis.
fn frame<'a, 'b, X: Ranged>(
    root: &'a Area<'b>,
    title: &str,
    x: X,
) -> Result<ChartContext<'a, SVGBackend<'b>, Cartesian2d<X, RangedCoordf64>>, DrawError> {
    ChartBuilder::on(root)
        .caption(title, title_font())
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x, 0.0..100.0)
}

fn draw_accuracy(summary: &Summary, root: &Area<'_>) -> Result<(), DrawError> {
    const TITLE: &str = "Accuracy by arm (±1 standard error)";
    let arms = scored_arms(summary);
    if arms.is_empty() {
        return draw_empty(root, TITLE, "no scored items");
    }
    let names: Vec<&str> = arms.iter().map(|s| s.arm.arm.as_str()).collect();
    let mut chart = frame(root, TITLE, Slots::of(arms.len()))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|v| {
            names
                .get(Slots::index(*v))
                .copied()
                .unwrap_or("")
                .to_string()
        })
        .x_label_style(label_font())
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_desc("accuracy (%)")
        .draw()?;
    // Bars fill 70 % of a slot from four arms up, proportionally less below (one arm alone
    // would otherwise be a wall).
    let half = 0.35 * (arms.len().min(4) as f64 / 4.0);
    chart.draw_series(arms.iter().enumerate().map(|(i, s)| {
        let x = Slots::centre(i);
        let corners = [(x - half, 0.0), (x + half, s.accuracy)];
        Rectangle::new(corners, arm_color(s.arm.arm).mix(0.75).filled())
    }))?;
    chart.draw_series(arms.iter().enumerate().map(|(i, s)| {
        let (low, high) = error_range(s);
        let style = BLACK.stroke_width(2);
        ErrorBar::new_vertical(Slots::centre(i), low, s.accuracy, high, style, 16)
    }))?;
    chart.draw_series(arms.iter().enumerate().map(|(i, s)| {
        let style = label_font().pos(Pos::new(HPos::Center, VPos::Bottom));
        EmptyElement::at((Slots::centre(i), error_range(s).1))
            + Text::new(format!("{:.1} %", s.accuracy), (0, -6), style)
    }))?;
    Ok(())
}

/// Accuracy ± 1 stderr, clamped to 0–100 %.
fn error_range(s: &Scored<'_>) -> (f64, f64) {
    (
        (s.accuracy - s.stderr).max(0.0),
        (s.accuracy + s.stderr).min(100.0),
    )
}

/// One arm's accuracy by round, in percent.
type RoundLine = (Arm, Vec<(u32, f64)>);

/// The scored arms with at least one scored round.
fn round_lines(summary: &Summary) -> Vec<RoundLine> {
    let points = |arm: &ArmSummary| -> Vec<(u32, f64)> {
        let scored = arm
            .rounds
            .iter()
            .filter_map(|r| Some((r.round, r.accuracy? * 100.0)));
        scored.collect()
    };
    summary
        .arms
        .iter()
        .filter(|a| a.accuracy.is_some())
        .map(|a| (a.arm, points(a)))
        .filter(|(_, points)| !points.is_empty())
        .collect()
}

fn draw_rounds(summary: &Summary, root: &Area<'_>) -> Result<(), DrawError> {
    const TITLE: &str = "Accuracy by round";
    if scored_arms(summary).is_empty() {
        return draw_empty(root, TITLE, "no scored items");
    }
    let lines = round_lines(summary);
    let rounds = lines.iter().flat_map(|(_, p)| p.iter().map(|(r, _)| *r));
    let Some(last) = rounds.max() else {
        return draw_empty(root, TITLE, "no round data");
    };
    let mut chart = frame(root, TITLE, Slots::of(last as usize + 1))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|v| Slots::index(*v).to_string())
        .x_desc("round")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_desc("accuracy (%)")
        .draw()?;
    for line in &lines {
        draw_round_line(&mut chart, line)?;
    }
    chart
        .configure_series_labels()
        .position(legend_position(&lines))
        .label_font(label_font())
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// One arm's line, its points, and its legend entry.
fn draw_round_line(
    chart: &mut ChartContext<'_, SVGBackend<'_>, Cartesian2d<Slots, RangedCoordf64>>,
    (arm, points): &RoundLine,
) -> Result<(), DrawError> {
    let color = arm_color(*arm);
    let at = |&(r, acc): &(u32, f64)| (Slots::centre(r as usize), acc);
    chart
        .draw_series(LineSeries::new(
            points.iter().map(at),
            color.stroke_width(3),
        ))?
        .label(arm.as_str())
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], color.filled()));
    chart.draw_series(points.iter().map(|p| Circle::new(at(p), 4, color.filled())))?;
    Ok(())
}

/// The legend goes in the right-hand corner the last rounds' points are furthest from.
fn legend_position(lines: &[RoundLine]) -> SeriesLabelPosition {
    let last: Vec<f64> = lines
        .iter()
        .filter_map(|(_, p)| p.last().map(|l| l.1))
        .collect();
    let mean = last.iter().sum::<f64>() / last.len().max(1) as f64;
    if mean >= 50.0 {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperRight
    }
}

fn draw_tokens(summary: &Summary, root: &Area<'_>) -> Result<(), DrawError> {
    const TITLE: &str = "Mean tokens per run against accuracy";
    let arms = scored_arms(summary);
    if arms.is_empty() {
        return draw_empty(root, TITLE, "no scored items");
    }
    // Headroom on the right for the point labels.
    let max_tokens = arms.iter().map(|s| s.arm.mean_tokens).fold(1.0, f64::max) * 1.25;
    let mut chart = frame(root, TITLE, RangedCoordf64::from(0.0..max_tokens))?;
    chart
        .configure_mesh()
        .x_desc("mean tokens per run")
        .y_desc("accuracy (%)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    let at = |s: &Scored<'_>| (s.arm.mean_tokens, s.accuracy);
    let pixels: Vec<_> = arms.iter().map(|s| chart.backend_coord(&at(s))).collect();
    let widths: Vec<_> = arms
        .iter()
        .map(|s| label_width(s.arm.arm.as_str()))
        .collect();
    let offsets = label_offsets(&pixels, &widths);
    chart.draw_series(arms.iter().zip(offsets).map(|(s, offset)| {
        EmptyElement::at(at(s))
            + Circle::new((0, 0), POINT_RADIUS, arm_color(s.arm.arm).filled())
            + Text::new(s.arm.arm.as_str(), offset, label_font())
    }))?;
    Ok(())
}

/// Radius of a point in the tokens plot, pixels.
const POINT_RADIUS: i32 = 6;
/// Height of a 14 px label, pixels.
const LABEL_HEIGHT: i32 = 14;
/// Where a point's label may go, in order of preference: (right of the point, top offset).
const LABEL_SPOTS: [(bool, i32); 6] = [
    (true, -16),
    (true, 2),
    (false, -16),
    (false, 2),
    (true, -32),
    (true, 18),
];

/// Estimated width of a 14 px sans-serif label (SVG text is measured by the viewer, not here).
fn label_width(text: &str) -> i32 {
    i32::try_from(text.chars().count()).unwrap_or(i32::MAX / 8) * 8
}

/// Pixel rectangle: left, top, right, bottom.
type PixelBox = (i32, i32, i32, i32);

fn overlaps(a: PixelBox, b: PixelBox) -> bool {
    a.0 < b.2 && b.0 < a.2 && a.1 < b.3 && b.1 < a.3
}

/// The offset of each point's label (its top-left corner, relative to the point), taking the
/// first spot of [`LABEL_SPOTS`] that clears every point and every label placed before; the
/// first spot when none does. Arms matched on budget sit close together, so this matters.
fn label_offsets(points: &[(i32, i32)], widths: &[i32]) -> Vec<(i32, i32)> {
    let r = POINT_RADIUS;
    let mut taken: Vec<PixelBox> = points
        .iter()
        .map(|&(x, y)| (x - r, y - r, x + r, y + r))
        .collect();
    let mut offsets = Vec::with_capacity(points.len());
    for (&(x, y), &w) in points.iter().zip(widths) {
        let offset_of = |(right, dy): (bool, i32)| (if right { r + 4 } else { -r - 4 - w }, dy);
        let label_box = |(dx, dy): (i32, i32)| (x + dx, y + dy, x + dx + w, y + dy + LABEL_HEIGHT);
        let offset = LABEL_SPOTS
            .into_iter()
            .map(offset_of)
            .find(|&o| taken.iter().all(|&t| !overlaps(t, label_box(o))))
            .unwrap_or_else(|| offset_of(LABEL_SPOTS[0]));
        taken.push(label_box(offset));
        offsets.push(offset);
    }
    offsets
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::report::tests::{empty_summary, summary};

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).expect("plot file readable")
    }

    /// An SVG document, as far as a text check can tell.
    fn assert_svg(svg: &str) {
        let start = svg.trim_start();
        assert!(
            start.starts_with("<svg") || start.starts_with("<?xml"),
            "{svg}"
        );
        assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
    }

    fn has_text(svg: &str, text: &str) -> bool {
        svg.contains(&format!(">{text}</text>")) || svg.contains(&format!(">\n{text}\n</text>"))
    }

    /// `<polyline>` elements stroked in `arm`'s colour.
    fn lines_of(svg: &str, arm: Arm) -> usize {
        let RGBColor(r, g, b) = arm_color(arm);
        let stroke = format!("stroke=\"#{r:02X}{g:02X}{b:02X}\"");
        svg.split("<polyline")
            .skip(1)
            .filter(|tag| tag[..tag.find('>').unwrap_or(0)].contains(&stroke))
            .count()
    }

    #[test]
    fn writes_three_svgs_with_every_arm_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("run").join(PLOTS_DIR);
        let paths = write_plots(&summary(), &out).expect("plots written");
        let names: Vec<_> = paths
            .iter()
            .map(|p| p.file_name().and_then(|n| n.to_str()))
            .collect();
        assert_eq!(
            names,
            [Some(ACCURACY_FILE), Some(ROUNDS_FILE), Some(TOKENS_FILE)]
        );
        for path in &paths {
            assert!(path.starts_with(&out));
            let svg = read(path);
            assert_svg(&svg);
            for arm in Arm::ALL {
                assert!(
                    has_text(&svg, arm.as_str()),
                    "{} lacks {arm}:\n{svg}",
                    path.display()
                );
            }
        }
        let accuracy = read(&paths[0]);
        assert!(has_text(&accuracy, "62.5 %"), "{accuracy}");
        assert!(accuracy.contains("Accuracy by arm"));
    }

    #[test]
    fn rounds_plot_has_one_line_per_arm_with_rounds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut summary = summary();
        let paths = write_plots(&summary, dir.path()).expect("plots written");
        let svg = read(&paths[1]);
        for arm in Arm::ALL {
            assert_eq!(lines_of(&svg, arm), 1, "{arm}:\n{svg}");
        }
        summary.arms[0].rounds.clear();
        let paths = write_plots(&summary, dir.path()).expect("plots rewritten");
        let svg = read(&paths[1]);
        assert_eq!(lines_of(&svg, Arm::Single), 0, "{svg}");
        assert!(!has_text(&svg, "single"), "{svg}");
        assert_eq!(lines_of(&svg, Arm::Council), 1, "{svg}");
    }

    /// Widths of the filled `<rect>`s in `arm`'s colour.
    fn bar_widths(svg: &str, arm: Arm) -> Vec<i32> {
        let RGBColor(r, g, b) = arm_color(arm);
        let fill = format!("fill=\"#{r:02X}{g:02X}{b:02X}\"");
        svg.split("<rect")
            .skip(1)
            .map(|tag| &tag[..tag.find('>').unwrap_or(0)])
            .filter(|tag| tag.contains(&fill))
            .filter_map(|tag| {
                let width = tag.split("width=\"").nth(1)?;
                width[..width.find('"')?].parse().ok()
            })
            .collect()
    }

    #[test]
    fn arms_without_accuracy_are_left_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut summary = summary();
        summary.arms[1] = empty_summary().arms[1].clone();
        for path in write_plots(&summary, dir.path()).expect("plots written") {
            let svg = read(&path);
            assert!(!has_text(&svg, "self_refine"), "{}:\n{svg}", path.display());
            assert!(has_text(&svg, "council"), "{}:\n{svg}", path.display());
        }
    }

    #[test]
    fn empty_summary_still_writes_three_captioned_svgs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = write_plots(&empty_summary(), dir.path()).expect("plots written");
        assert_eq!(paths.len(), 3);
        for path in &paths {
            let svg = read(path);
            assert_svg(&svg);
            assert!(
                svg.contains("no scored items"),
                "{}:\n{svg}",
                path.display()
            );
        }
    }

    #[test]
    fn one_scored_arm_is_enough() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut summary = empty_summary();
        summary.arms[3] = crate::eval::report::tests::summary().arms[3].clone();
        let paths = write_plots(&summary, dir.path()).expect("plots written");
        for path in &paths {
            let svg = read(path);
            assert_svg(&svg);
            assert!(has_text(&svg, "council"), "{}:\n{svg}", path.display());
        }
        // A lone category must not collapse to a zero-width bar.
        let widths = bar_widths(&read(&paths[0]), Arm::Council);
        assert!(matches!(widths[..], [w] if w > 50), "{widths:?}");
    }

    #[test]
    fn labels_of_close_points_do_not_overlap() {
        let points = [(300, 200), (302, 199), (301, 201), (500, 100)];
        let widths = [56, 64, 88, 56];
        let offsets = label_offsets(&points, &widths);
        assert_eq!(
            offsets[3],
            (POINT_RADIUS + 4, -16),
            "a lone point keeps the first spot"
        );
        let boxes: Vec<PixelBox> = points
            .iter()
            .zip(&widths)
            .zip(&offsets)
            .map(|((&(x, y), &w), &(dx, dy))| (x + dx, y + dy, x + dx + w, y + dy + LABEL_HEIGHT))
            .collect();
        for (i, a) in boxes.iter().enumerate() {
            for b in &boxes[i + 1..] {
                assert!(!overlaps(*a, *b), "{a:?} overlaps {b:?}");
            }
            for &(x, y) in &points {
                let r = POINT_RADIUS;
                assert!(
                    !overlaps(*a, (x - r, y - r, x + r, y + r)),
                    "{a:?} covers ({x}, {y})"
                );
            }
        }
    }

    #[test]
    fn error_names_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").expect("file written");
        let err = write_plots(&summary(), &file).expect_err("a file is no directory");
        assert!(
            matches!(&err, PlotError::CreateDir { dir, .. } if *dir == file),
            "{err:?}"
        );
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }
}
