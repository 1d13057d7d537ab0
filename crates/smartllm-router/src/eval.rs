//! Cost/quality curves of routing strategies on labelled prompts: for each
//! operating point, the share of the best single model's quality kept and the
//! share of its cost paid.

use serde::Serialize;

/// One labelled prompt: every model's score (0-1) and cost (USD).
#[derive(Debug, Clone)]
pub struct EvalRow {
    pub scores: Vec<f64>,
    pub costs: Vec<f64>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Point {
    pub cost_share: f64,
    pub quality_share: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    pub name: String,
    pub points: Vec<Point>,
}

/// The best model (highest mean score) and the cheapest (lowest total cost).
pub fn best_and_cheapest(rows: &[EvalRow], n_models: usize) -> (usize, usize) {
    let total = |f: &dyn Fn(&EvalRow) -> f64| rows.iter().map(f).sum::<f64>();
    let best = (0..n_models)
        .max_by(|a, b| total(&|r| r.scores[*a]).total_cmp(&total(&|r| r.scores[*b])))
        .unwrap_or(0);
    let cheapest = (0..n_models)
        .min_by(|a, b| total_cost(rows, *a).total_cmp(&total_cost(rows, *b)))
        .unwrap_or(0);
    (best, cheapest)
}

/// A model's cost over all the rows. Every cost share is a share of the
/// best model's: where that is not above 0 (an unpriced model, data that
/// says it costs nothing) no share means anything, and callers refuse
/// (the shares below would all read 0).
pub fn total_cost(rows: &[EvalRow], model: usize) -> f64 {
    rows.iter().map(|r| r.costs[model]).sum()
}

fn point(rows: &[EvalRow], best: usize, choice: impl Fn(usize) -> usize) -> Point {
    let (mut q, mut c, mut qb, mut cb) = (0.0, 0.0, 0.0, 0.0);
    for (i, r) in rows.iter().enumerate() {
        let m = choice(i);
        q += r.scores[m];
        c += r.costs[m];
        qb += r.scores[best];
        cb += r.costs[best];
    }
    Point {
        cost_share: if cb > 0.0 { c / cb } else { 0.0 },
        quality_share: if qb > 0.0 { q / qb } else { 0.0 },
    }
}

/// The point of one fixed choice per row (`choices[i]`: the model index row
/// `i` went to), e.g. a router's decisions or always the same model.
pub fn choice_point(rows: &[EvalRow], best: usize, choices: &[usize]) -> Point {
    point(rows, best, |i| choices.get(i).copied().unwrap_or(best))
}

/// One point per cost weight λ (`lambdas`): each row goes to the model of
/// the highest `utility(row, model, λ)`; on equal utility, the cheaper model
/// when `cheaper_on_ties`, else the last.
fn sweep(
    rows: &[EvalRow],
    best: usize,
    lambdas: impl Iterator<Item = f64>,
    utility: impl Fn(usize, usize, f64) -> f64,
    cheaper_on_ties: bool,
) -> Vec<Point> {
    lambdas
        .map(|lambda| {
            point(rows, best, |i| {
                let r = &rows[i];
                (0..r.scores.len())
                    .max_by(|a, b| {
                        let by_utility = utility(i, *a, lambda).total_cmp(&utility(i, *b, lambda));
                        if cheaper_on_ties {
                            by_utility.then(r.costs[*b].total_cmp(&r.costs[*a]))
                        } else {
                            by_utility
                        }
                    })
                    .unwrap_or(best)
            })
        })
        .collect()
}

/// λ = 0, then `steps` geometric steps `first · growth^step`.
fn lambdas(steps: i32, first: f64, growth: f64) -> impl Iterator<Item = f64> {
    (0..=steps).map(move |step| {
        if step == 0 {
            0.0
        } else {
            first * growth.powi(step)
        }
    })
}

/// A router that predicts a quality per model and row, swept over how much
/// cost counts: pick argmax(predicted − λ · cost / most expensive).
pub fn predicted_curve(name: &str, rows: &[EvalRow], predicted: &[Vec<f64>], best: usize) -> Curve {
    let utility = |i: usize, m: usize, lambda: f64| {
        let r = &rows[i];
        let maxc = r.costs.iter().cloned().fold(0.0, f64::max).max(1e-12);
        predicted[i][m] - lambda * r.costs[m] / maxc
    };
    Curve {
        name: name.into(),
        points: sweep(rows, best, lambdas(80, 0.005, 1.08), utility, false),
    }
}

/// The per-prompt oracle swept over how much cost counts: each row's true
/// scores taken as the prediction. On profile simulations, where a model's
/// score is its quality for the prompt's labelled task, this is the per-task
/// oracle: the most any router that knew every prompt's task could keep at
/// each share of the cost, the ceiling the profiles themselves allow.
///
/// Swept on absolute cost (not each row's cost relative to its dearest
/// model, as [`predicted_curve`] mirrors the gateway's rule), so each point
/// is the best total quality for its total cost; every single model's own
/// point is on it too, as a policy the oracle may also take.
pub fn oracle_curve(rows: &[EvalRow], best: usize) -> Curve {
    let n = rows.first().map_or(0, |r| r.scores.len());
    let scale = rows.iter().map(|r| r.costs[best]).sum::<f64>() / rows.len().max(1) as f64;
    let scale = scale.max(1e-12);
    let utility =
        |i: usize, m: usize, lambda: f64| rows[i].scores[m] - lambda * rows[i].costs[m] / scale;
    let mut points: Vec<Point> = (0..n).map(|m| point(rows, best, |_| m)).collect();
    points.extend(sweep(rows, best, lambdas(160, 0.001, 1.06), utility, true));
    Curve {
        name: "oracle".into(),
        points,
    }
}

/// Random routing: the best model with probability p, else the cheapest (in expectation).
pub fn random_curve(rows: &[EvalRow], best: usize, cheapest: usize) -> Curve {
    let b = point(rows, best, |_| best);
    let c = point(rows, best, |_| cheapest);
    let points = (0..=20)
        .map(|i| {
            let p = i as f64 / 20.0;
            Point {
                cost_share: p * b.cost_share + (1.0 - p) * c.cost_share,
                quality_share: p * b.quality_share + (1.0 - p) * c.quality_share,
            }
        })
        .collect();
    Curve {
        name: "random".into(),
        points,
    }
}

/// Always one model.
pub fn oracle_point(rows: &[EvalRow], best: usize) -> Point {
    point(rows, best, |i| {
        let r = &rows[i];
        // The cheapest model that reaches the best score on this prompt.
        let top = r.scores.iter().cloned().fold(0.0, f64::max);
        (0..r.scores.len())
            .filter(|m| r.scores[*m] >= top - 1e-9)
            .min_by(|a, b| r.costs[*a].total_cmp(&r.costs[*b]))
            .unwrap_or(best)
    })
}

/// Quality kept at a given cost share, on the curve's upper envelope
/// (the concave envelope of its Pareto points, i.e. the best random mix of
/// two of them; 0 below its cheapest point).
pub fn quality_at(curve: &Curve, cost_share: f64) -> f64 {
    let mut pts = curve.points.clone();
    pts.sort_by(|a, b| a.cost_share.total_cmp(&b.cost_share));
    let mut frontier: Vec<Point> = Vec::new();
    for p in pts {
        if frontier
            .last()
            .is_none_or(|l| p.quality_share > l.quality_share)
        {
            frontier.push(p);
        }
    }
    // Any two operating points can be mixed (each request sent by one or
    // the other at random), so the value is the best chord over the cost:
    // the concave envelope, not only neighbouring points.
    let mut best = 0.0f64;
    for (i, a) in frontier.iter().enumerate() {
        for b in &frontier[i + 1..] {
            if a.cost_share <= cost_share
                && cost_share <= b.cost_share
                && b.cost_share > a.cost_share
            {
                let t = (cost_share - a.cost_share) / (b.cost_share - a.cost_share);
                best = best.max(a.quality_share + t * (b.quality_share - a.quality_share));
            }
        }
    }
    for p in &frontier {
        if p.cost_share <= cost_share {
            best = best.max(p.quality_share);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_perfect_predictor_beats_random() {
        // Half the prompts are easy (both models score 1), half hard (cheap fails).
        let rows: Vec<EvalRow> = (0..100)
            .map(|i| EvalRow {
                scores: if i % 2 == 0 {
                    vec![1.0, 1.0]
                } else {
                    vec![0.2, 1.0]
                },
                costs: vec![0.1, 1.0],
            })
            .collect();
        let (best, cheapest) = best_and_cheapest(&rows, 2);
        assert_eq!((best, cheapest), (1, 0));
        let predicted: Vec<Vec<f64>> = rows.iter().map(|r| r.scores.clone()).collect();
        let learned = predicted_curve("learned", &rows, &predicted, best);
        let random = random_curve(&rows, best, cheapest);
        // Routing only the hard half to the strong model: full quality at 55% of the cost.
        assert!((quality_at(&learned, 0.56) - 1.0).abs() < 1e-9);
        assert!(quality_at(&random, 0.56) < 0.85);
        let o = oracle_point(&rows, best);
        assert!((o.cost_share - 0.55).abs() < 1e-9 && (o.quality_share - 1.0).abs() < 1e-9);
        // Fixed choices: always the cheap model, and the oracle's own choices.
        let cheap = choice_point(&rows, best, &[0; 100]);
        assert!((cheap.cost_share - 0.1).abs() < 1e-9);
        assert!((cheap.quality_share - 0.6).abs() < 1e-9);
        let oracle_choices: Vec<usize> = (0..100).map(|i| i % 2).collect();
        assert_eq!(choice_point(&rows, best, &oracle_choices), o);
        // The oracle's curve is the perfect predictor's.
        let curve = oracle_curve(&rows, best);
        assert!((quality_at(&curve, 0.56) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn total_costs_pick_the_cheapest() {
        let rows = vec![
            EvalRow {
                scores: vec![1.0, 0.5, 0.2],
                costs: vec![1.0, 0.0, 0.25],
            },
            EvalRow {
                scores: vec![1.0, 0.5, 0.2],
                costs: vec![2.0, 0.5, 0.25],
            },
        ];
        assert_eq!(total_cost(&rows, 0), 3.0);
        assert_eq!(total_cost(&rows, 1), 0.5);
        assert_eq!(total_cost(&rows, 2), 0.5);
        assert_eq!(best_and_cheapest(&rows, 3), (0, 1));
        assert_eq!(total_cost(&[], 0), 0.0);
    }

    #[test]
    fn quality_at_mixes_any_two_points() {
        let p = |c, q| Point {
            cost_share: c,
            quality_share: q,
        };
        let curve = Curve {
            name: "c".into(),
            points: vec![p(0.7, 1.0), p(0.3, 0.9), p(0.6, 0.92)],
        };
        // Half-way between the 30% and 70% points, above the 60% one's chord.
        assert!((quality_at(&curve, 0.5) - 0.95).abs() < 1e-9);
        assert!((quality_at(&curve, 0.3) - 0.9).abs() < 1e-9);
        assert_eq!(quality_at(&curve, 0.2), 0.0);
        assert!((quality_at(&curve, 0.9) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn the_oracle_curve_bounds_every_router_and_single_model() {
        // Three models; which is worth its price depends on the task: the
        // mid model is as good as the dear one on even rows, the cheap one
        // as good on every third.
        let rows: Vec<EvalRow> = (0..60)
            .map(|i| EvalRow {
                scores: vec![
                    if i % 3 == 0 { 0.9 } else { 0.5 },
                    if i % 2 == 0 { 0.9 } else { 0.7 },
                    0.9,
                ],
                costs: vec![0.05, 0.4, 1.0],
            })
            .collect();
        let (best, _) = best_and_cheapest(&rows, 3);
        assert_eq!(best, 2);
        let oracle = oracle_curve(&rows, best);
        // A router that always believes the mid model is as good as the dear one.
        let naive: Vec<Vec<f64>> = rows.iter().map(|_| vec![0.5, 0.9, 0.9]).collect();
        let router = predicted_curve("naive", &rows, &naive, best);
        for share in [0.1, 0.2, 0.4, 0.6, 0.8, 1.0] {
            let o = quality_at(&oracle, share);
            assert!(o + 1e-9 >= quality_at(&router, share), "at {share}");
            for m in 0..3 {
                let p = choice_point(&rows, best, &[m; 60]);
                if p.cost_share <= share {
                    assert!(o + 1e-9 >= p.quality_share, "model {m} at {share}");
                }
            }
        }
        // At the mid model's cost (40%) the mid model alone keeps 88.9%;
        // the oracle (the cheap model where it is as good, the mid one on
        // the rest, the dear one on part of the odd rows) keeps 96.9%.
        let mid = choice_point(&rows, best, &[1; 60]);
        assert!((mid.cost_share - 0.4).abs() < 1e-9);
        assert!((mid.quality_share - 0.8 / 0.9).abs() < 1e-9);
        let at_mid = quality_at(&oracle, mid.cost_share);
        assert!((at_mid - 0.969).abs() < 0.002, "{at_mid}");
    }
}
