// Custom events from a multi-page site: hydra is either the real API or the pre-load snippet's queue.
document.querySelectorAll('button[data-plan]').forEach(function (button) {
  button.addEventListener('click', function () {
    window.hydra.track('clicked_upgrade', { plan: button.dataset.plan, source: 'pricing_page' });
  });
});
