//! Draws a run's per-second samples (CSV files with a `second` column, as `shoppers --stats`
//! and `order_load --stats` write them) as an SVG: counts and rates above, latencies below.
//! Several inputs (one per client process) are added up second by second; latency columns
//! take the worst of them.
//!
//!     chart --out run.svg --title "200k shoppers" --gauge open --rate requests \
//!           --rate answered a.csv b.csv ...

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;
use plotters::prelude::*;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "")]
    title: String,
    /// Columns drawn as they are (summed over the inputs).
    #[arg(long)]
    gauge: Vec<String>,
    /// Cumulative columns drawn per second (summed over the inputs).
    #[arg(long)]
    rate: Vec<String>,
    /// Latency columns in milliseconds (the worst input each second), drawn below.
    #[arg(long)]
    ms: Vec<String>,
    inputs: Vec<PathBuf>,
}

/// second -> column -> values of every input.
type Samples = BTreeMap<u64, BTreeMap<String, Vec<f64>>>;

fn read(inputs: &[PathBuf]) -> Samples {
    let mut samples = Samples::new();
    for path in inputs {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
        for line in lines {
            // An empty cell is no value (a second without latencies to report).
            let values: Vec<Option<f64>> = line.split(',').map(|v| v.parse().ok()).collect();
            let Some(second) = header
                .iter()
                .position(|c| *c == "second")
                .and_then(|i| *values.get(i)?)
            else {
                continue;
            };
            let row = samples.entry(second as u64).or_default();
            for (column, value) in header.iter().zip(&values) {
                if let Some(value) = value {
                    row.entry((*column).to_owned()).or_default().push(*value);
                }
            }
        }
    }
    samples
}

fn series(samples: &Samples, column: &str, combine: fn(&[f64]) -> f64) -> Vec<(f64, f64)> {
    samples
        .iter()
        .filter_map(|(second, row)| Some((*second as f64, combine(row.get(column)?))))
        .collect()
}

fn per_second(points: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    points
        .windows(2)
        .map(|w| (w[1].0, (w[1].1 - w[0].1) / (w[1].0 - w[0].0).max(1.0)))
        .collect()
}

type Drawn = Result<(), Box<dyn std::error::Error>>;

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    lines: &[(String, Vec<(f64, f64)>)],
) -> Drawn {
    let x_max = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .fold(1.0, f64::max);
    let y_max = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .draw()?;
    for (i, (name, points)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn main() -> Drawn {
    let args = Args::parse();
    let samples = read(&args.inputs);
    let sum = |v: &[f64]| v.iter().sum();
    let worst = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let mut counts: Vec<(String, Vec<(f64, f64)>)> = args
        .gauge
        .iter()
        .map(|c| (c.clone(), series(&samples, c, sum)))
        .collect();
    counts.extend(
        args.rate
            .iter()
            .map(|c| (format!("{c}/s"), per_second(series(&samples, c, sum)))),
    );
    let latencies: Vec<(String, Vec<(f64, f64)>)> = args
        .ms
        .iter()
        .map(|c| (c.clone(), series(&samples, c, worst)))
        .collect();
    let height = if latencies.is_empty() { 400 } else { 800 };
    let root = SVGBackend::new(&args.out, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    if latencies.is_empty() {
        panel(&root, &args.title, &counts)?;
    } else {
        let (top, bottom) = root.split_vertically(400);
        panel(&top, &args.title, &counts)?;
        panel(&bottom, "latency (ms)", &latencies)?;
    }
    root.present()?;
    Ok(())
}
