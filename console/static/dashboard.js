// Site Activity dashboard: draws the pageviews/visitors chart (uPlot, vendored) from the JSON the server put in
// the page, and refreshes "visitors now" every 10 s from /site-activity/realtime.json (session cookie).
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("chart-data").textContent);
  var box = document.getElementById("chart");
  var hourly = data.interval === "hour";
  var opts = {
    width: Math.max(320, box.clientWidth || 800),
    height: 260,
    scales: { x: { time: true } },
    series: [
      { value: function (u, v) { return v == null ? "" : new Date(v * 1000).toISOString().slice(0, hourly ? 16 : 10).replace("T", " "); } },
      { label: "Pageviews", stroke: "#3b6fd6", fill: "rgba(59,111,214,0.12)", width: 2 },
      { label: "Visitors", stroke: "#d6803b", width: 2 },
    ],
    axes: [{}, { size: 60 }],
    tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"); },
  };
  window.siteActivityChart = new uPlot(opts, [data.time, data.pageviews, data.visitors], box);

  var now = document.getElementById("visitors-now");
  function refresh() {
    fetch("/site-activity/realtime.json?widget_id=" + encodeURIComponent(now.dataset.widget),
          { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (body) { now.textContent = String(body.visitors); now.dataset.refreshedAt = body.now; })
      .catch(function () { now.title = "could not refresh"; });
  }
  setInterval(refresh, 10000);
})();
