// The comparison page's one chart: both jobs' validation metric per round, from the JSON the
// server put in #compare-chart (training/web/job_compare.py, JobComparison.chart). The same
// values are in the table below it; this file only draws them.
(function () {
  "use strict";
  const data = document.getElementById("compare-chart");
  const el = document.getElementById("chart-compare");
  if (!data || !el || !window.Plotly) return;
  const chart = JSON.parse(data.textContent);
  // Each job in the colour the server gives it (consortium/core/palette.py, the same palette as
  // the job page and the PDF reports); job B dashed, for print.
  const traces = chart.traces.map((t, i) => ({
    x: t.rounds, y: t.values, name: t.name, mode: "lines+markers", connectgaps: true,
    line: { color: t.colour, dash: i ? "dash" : "solid" }, marker: { color: t.colour },
  }));
  const axis = { color: chart.axis, gridcolor: chart.grid };
  const yaxis = { title: { text: chart.metric || "metric" }, ...axis };
  if (chart.unit_range) yaxis.range = [0, 1];
  window.Plotly.newPlot(el, traces, {
    margin: { t: 10, r: 10, b: 50, l: 60 }, height: 320, showlegend: true,
    legend: { orientation: "h", x: 0, y: -0.25, yanchor: "top" },
    xaxis: { title: { text: "round" }, dtick: 1, rangemode: "tozero", ...axis }, yaxis,
  }, { displayModeBar: false, responsive: true });
}());
