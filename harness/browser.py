"""Chromium through Playwright, as the browser-based tests start it."""




CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']


def launch_chromium(playwright):
    """Debian's headless Chromium through playwright: no sandbox (the tests may run as root), no calls home."""
    return playwright.chromium.launch(executable_path='/usr/bin/chromium', args=CHROMIUM_ARGS)
