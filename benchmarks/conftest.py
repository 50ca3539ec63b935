import os


def pytest_addoption(parser):
    parser.addoption(
        "--upstream", metavar="PATH", help="checkout of upstream's old-variableComp branch: adds provider 'upstream'"
    )


def pytest_configure(config):
    path = config.getoption("--upstream", default=None)
    if path:
        os.environ["TITOK_UPSTREAM"] = path
