// The SPA part of the demo: pushState routing plus buttons calling hydra.track / hydra.identify.
(function () {
  var titles = { '/app': 'Dashboard', '/app/': 'Dashboard', '/app/projects': 'Projects', '/app/settings': 'Settings' };
  var log = document.getElementById('log');

  function note(text) {
    log.textContent = new Date().toLocaleTimeString() + '  ' + text + '\n' + log.textContent;
  }

  function render() {
    document.getElementById('title').textContent = titles[location.pathname] || 'Not found';
  }

  document.querySelectorAll('a[data-route]').forEach(function (link) {
    link.addEventListener('click', function (event) {
      event.preventDefault();
      if (link.pathname === location.pathname) return;
      history.pushState({}, '', link.pathname); // the widget notices this and sends a pageview
      render();
      note('navigated to ' + link.pathname + ' (pageview)');
    });
  });
  window.addEventListener('popstate', render);

  document.getElementById('upgrade').addEventListener('click', function () {
    hydra.track('clicked_upgrade', { plan: 'growth', source: 'app' });
    note("hydra.track('clicked_upgrade', {plan: 'growth', source: 'app'})");
  });
  document.getElementById('export').addEventListener('click', function () {
    hydra.track('exported_report', { report_id: 'r_4815', rows: 120 });
    note("hydra.track('exported_report', {report_id: 'r_4815', rows: 120})");
  });
  document.getElementById('burst').addEventListener('click', function () {
    for (var i = 1; i <= 30; i++) hydra.track('burst', { n: i });
    note('30 × hydra.track(\'burst\') — the first 25 go out at once, the rest within 5 s');
  });
  document.getElementById('login').addEventListener('submit', function (event) {
    event.preventDefault();
    var form = new FormData(event.target);
    var traits = { email: form.get('email'), name: form.get('name'), plan: 'growth' };
    hydra.identify(form.get('user_id'), traits);
    note("hydra.identify('" + form.get('user_id') + "', " + JSON.stringify(traits) + ')');
  });
  render();
})();
