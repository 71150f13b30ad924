// The device page's charts, drawn by uPlot (vendored from npm by `make setup`).
import uPlot from "./vendor/uPlot.esm.js";

const ACCENT = "#1d4ed8";
const BAND = "rgba(29, 78, 216, 0.15)";

function size(container) {
  return { width: Math.max(300, container.clientWidth || 600), height: 240 };
}

function fit(container, plot) {
  const observer = new ResizeObserver(() => plot.setSize(size(container)));
  observer.observe(container);
  return () => observer.disconnect();
}

// The last `windowS` seconds: seeded with the readings endpoint's buckets (their mean), then
// one point per live reading; the time axis moves on with the clock.
export function liveChart(container, windowS) {
  let metric = null;
  let xs = [];
  let ys = [];
  let plot = null;
  let seededUntil = 0; // the end of the last bucket the readings endpoint gave
  let unfit = () => {};
  const draw = () => {
    const now = Date.now() / 1000;
    while (xs.length && xs[0] < now - windowS) {
      xs.shift();
      ys.shift();
    }
    container.dataset.points = String(xs.length);
    if (!plot) return;
    plot.batch(() => {
      plot.setData([xs, ys], false);
      plot.setScale("x", { min: now - windowS, max: now });
    });
  };
  const timer = setInterval(draw, 2000);
  return {
    reset(name, series) {
      metric = name;
      xs = [];
      ys = [];
      seededUntil = 0;
      for (const b of series.points) {
        const stat = b.metrics[name];
        if (!stat) continue;
        xs.push(new Date(b.t).getTime() / 1000);
        ys.push(stat.avg);
        seededUntil = xs[xs.length - 1] + series.bucket_s;
      }
      if (plot) {
        plot.destroy();
        unfit();
      }
      container.replaceChildren();
      plot = new uPlot({
        ...size(container),
        title: `${name}, live`,
        scales: { x: { time: true } },
        series: [{}, { label: name, stroke: ACCENT, width: 2, points: { show: true, size: 4 } }],
        axes: [{}, { label: name, size: 70 }],
      }, [xs, ys], container);
      unfit = fit(container, plot);
      draw();
    },
    add(reading) {
      const value = metric && reading[metric];
      if (value === null || value === undefined) return;
      const t = new Date(reading.ts).getTime() / 1000;
      if (t < seededUntil) return; // in a bucket the chart was seeded with
      if (xs.length && t <= xs[xs.length - 1]) {
        // a late or repeated reading: keep the series in time order
        const i = xs.findIndex((x) => x >= t);
        if (xs[i] === t) return;
        xs.splice(i, 0, t);
        ys.splice(i, 0, value);
      } else {
        xs.push(t);
        ys.push(value);
      }
      draw();
    },
    destroy() {
      clearInterval(timer);
      unfit();
      if (plot) plot.destroy();
      plot = null;
    },
  };
}

// A chosen range: the mean per bucket as a line, and the band between min and max.
export function historyChart(container, name, series) {
  const xs = [];
  const lo = [];
  const avg = [];
  const hi = [];
  for (const b of series.points) {
    const stat = b.metrics[name];
    xs.push(new Date(b.t).getTime() / 1000);
    lo.push(stat ? stat.min : null);
    avg.push(stat ? stat.avg : null);
    hi.push(stat ? stat.max : null);
  }
  container.dataset.points = String(xs.length);
  container.replaceChildren();
  const plot = new uPlot({
    ...size(container),
    title: `${name}, ${series.bucket_s} s buckets`,
    scales: { x: { time: true, min: Date.parse(series.start) / 1000, max: Date.parse(series.end) / 1000 } },
    series: [
      {},
      { label: "mean", stroke: ACCENT, width: 2 },
      { label: "min", stroke: "#6b7585", width: 1 },
      { label: "max", stroke: "#6b7585", width: 1 },
    ],
    bands: [{ series: [3, 2], fill: BAND }],
    axes: [{}, { label: name, size: 70 }],
  }, [xs, avg, lo, hi], container);
  const unfit = fit(container, plot);
  return {
    destroy() {
      unfit();
      plot.destroy();
    },
  };
}
