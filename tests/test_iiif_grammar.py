"""The IIIF Image API 3.0 and 2.1 parameter grammar (iiif.py), as tables of cases from the specifications.

Most rows are the specifications' own examples (region, size, rotation and quality tables of section 4
in image/3.0/index.md and image/2.1/index.md). Their example image is 300 x 200 pixels: region
125,15,200,200 "Returned image is 175,185 px". The rest are the rules' edges and hostile input.
"""

import base64
import string
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import iiif
from iiif import IIIFError, Limits, Plan
from names import TEMP_PREFIX, name_problem

W, H = 300, 200
NONE = Limits()
BOUND = Limits(max_width=400)        # upscaling offered, bounded


def parse(version, region='full', size='max', rotation='0', quality_format='default.jpg', image=(W, H), limits=NONE):
    return iiif.parse_request(version, region, size, rotation, quality_format, *image, limits)


def status(version, **request):
    with pytest.raises(IIIFError) as refused:
        parse(version, **request)
    return refused.value.status


BOTH = pytest.mark.parametrize('version', [3, 2])


# Region (3.0 and 2.1 section 4.1: the same forms and examples) ######################################

REGIONS = [
    ('full', (0, 0, 300, 200)),                     # example 1
    ('square', (50, 0, 200, 200)),                  # example 2, centred in the longer dimension
    ('125,15,120,140', (125, 15, 120, 140)),        # example 3
    ('pct:41.6,7.5,40,70', (125, 15, 120, 140)),    # example 4
    ('125,15,200,200', (125, 15, 175, 185)),        # example 5: "Returned image is 175,185 px"
    ('pct:41.6,7.5,66.6,100', (125, 15, 175, 185)),  # example 6: the same, cropped at the edge
    ('0,0,300,200', (0, 0, 300, 200)),
    ('299,199,1,1', (299, 199, 1, 1)),
    ('299,199,999999999,999999999', (299, 199, 1, 1)),
    ('pct:0,0,100,100', (0, 0, 300, 200)),
    ('pct:99.9,99.9,100,100', (299, 199, 1, 1)),    # starts inside the image: at least its last pixel
    ('pct:10,10,0.01,0.01', (30, 20, 1, 1)),        # a non-zero region rounding to nothing is one pixel
    ('pct:0,0,1000,1000', (0, 0, 300, 200)),
    ('007,0,10,10', (7, 0, 10, 10)),
    ('pct:.5,0,10,10', (2, 0, 30, 20)),             # digits and "." only; ".5" is a SHOULD for clients
]


@BOTH
@pytest.mark.parametrize('region, expected', REGIONS)
def test_a_region_resolves_to_pixels_of_the_full_image(version, region, expected):
    assert parse(version, region=region).region == expected


@BOTH
def test_a_square_region_is_whole_pixels_centred_rounded_down(version):
    region = parse(version, region='square', image=(301, 200)).region
    assert region == (50, 0, 200, 200) and [type(n) for n in region] == [int] * 4


@BOTH
def test_a_square_region_of_a_tall_image_is_centred_vertically(version):
    assert parse(version, region='square', image=(200, 301)).region == (0, 50, 200, 200)


REFUSED_REGIONS = [
    '0,0,0,10', '0,0,10,0', 'pct:0,0,0,10', 'pct:0,0,10,0',   # "height or width is zero"
    '300,0,10,10', '0,200,10,10', 'pct:100,0,10,10', 'pct:0,100,10,10',  # "entirely outside"
    '1000000,0,10,10',
]


@BOTH
@pytest.mark.parametrize('region', REFUSED_REGIONS)
def test_an_empty_region_or_one_outside_the_image_is_a_400(version, region):
    assert status(version, region=region) == 400


HOSTILE_NUMBERS = [
    '1' + '0' * 30, '1000000000', 'NaN', 'nan', 'inf', 'Infinity', '-1', '+1', '1e5', '1E5', '0x10', '1_0',
    '', ' 1', '1 ', '1\n', '\u0661', '\uff11', '\u00b9', '1.5', '1,', '1/2', '%31', '1.', '\x00',
]


@BOTH
@pytest.mark.parametrize('number', HOSTILE_NUMBERS)
def test_a_pixel_region_with_a_number_outside_the_grammar_is_a_400(version, number):
    assert status(version, region=f'0,0,{number},10') == 400


HOSTILE_DECIMALS = [
    '1' + '0' * 30, '1234567890', '0.12345678901', 'NaN', 'inf', '-1', '+1', '1e1', '', '.', '1..0', '1.0.0',
    ' 1', '\u0661', '\uff11', '0,5', '1/2',
]


@BOTH
@pytest.mark.parametrize('number', HOSTILE_DECIMALS)
def test_a_percent_region_with_a_number_outside_the_grammar_is_a_400(version, number):
    assert status(version, region=f'pct:0,0,{number},10') == 400


HOSTILE_REGIONS = [
    '', 'Full', 'full ', ' full', 'FULL', 'squar', 'square,', '0,0,10', '0,0,10,10,', '0,0,10,10,10', ',,,',
    '0,,10,10', 'pct:', 'pct:0,0,10', 'pct:0,0,10,10,', 'pct0,0,10,10', 'PCT:0,0,10,10', 'pct: 0,0,10,10',
    'full/max', '0,0/10,10', '..', '%2F', 'x' * 1_000_000, '0,0,10,10\x00',
]


@BOTH
@pytest.mark.parametrize('region', HOSTILE_REGIONS)
def test_a_region_outside_the_grammar_is_a_400(version, region):
    assert status(version, region=region) == 400


@pytest.mark.parametrize('parameter, text, reason', [
    ('region', '0,0,10', 'Bad region.'), ('region', 'pct:a,0,10,10', 'Bad region.'),
    ('region', '0,0,x,10', 'Bad region.'),
    ('size', '1,2,3', 'Bad size.'), ('size', 'x,', 'Bad size.'), ('size', ',x', 'Bad size.'), ('size', '10,x', 'Bad size.'),
    ('size', '^pct:x', 'Bad size.'), ('size', 'pct:x', 'Bad size.'), ('size', '!x,10', 'Bad size.'),
    ('rotation', '-90', 'Bad rotation.'), ('region', None, 'Bad region.'), ('size', None, 'Bad size.'),
    ('rotation', None, 'Bad rotation.'), ('quality_format', None, 'Bad quality or format.'),
    ('quality_format', 'best.jpg', 'Bad quality.'), ('quality_format', 'default', 'Bad quality.')])
def test_a_parameter_outside_the_grammar_is_a_400_naming_the_parameter(parameter, text, reason):
    with pytest.raises(IIIFError) as refused:
        parse(3, **{parameter: text})
    assert (refused.value.status, refused.value.reason) == (400, reason)


REASONS = [                        # (version, request, limits, status, the reason a client is told)
    (3, {'region': '0,0,0,10'}, NONE, 400, 'Bad region: its width or height is zero.'),
    (3, {'region': '300,0,10,10'}, NONE, 400, 'Bad region: it lies entirely outside the image.'),
    (3, {'size': '!0,10'}, NONE, 400, 'Bad size: it is zero pixels wide or high.'),
    (3, {'size': 'pct:101'}, NONE, 400, 'Bad size: pct:n may not exceed 100; prefix it with ^ to upscale.'),
    (3, {'size': 'pct:0.1'}, NONE, 400, 'Bad size: it is less than one pixel wide or high.'),
    (3, {'size': '301,'}, BOUND, 400, 'Bad size: it is larger than the region; prefix it with ^ to upscale.'),
    (3, {'size': '^401,'}, BOUND, 400, 'Bad size: it is larger than maxWidth, maxHeight or maxArea.'),
    (2, {'size': '401,'}, BOUND, 404, 'Bad size: it is larger than maxWidth, maxHeight or maxArea.'),
    (3, {'rotation': '361'}, NONE, 400, 'Bad rotation: it must be from 0 to 360 degrees.'),
    (3, {'quality_format': 'default.tif'}, NONE, 400, 'Bad format: this server answers jpg, png and webp.'),
]


@pytest.mark.parametrize('version, request_, limits, expected, reason', REASONS)
def test_a_refused_request_tells_the_client_the_rule_it_breaks(version, request_, limits, expected, reason):
    with pytest.raises(IIIFError) as refused:
        parse(version, limits=limits, **request_)
    assert (refused.value.status, refused.value.reason) == (expected, reason)


@BOTH
@pytest.mark.parametrize('region', [None, b'full', 5, ['full']])
def test_a_parameter_that_is_not_text_is_a_400(version, region):
    assert status(version, region=region) == 400


# Size, 3.0 (section 4.2) #############################################################################

SIZES_3 = [
    ('max', NONE, (300, 200)),
    ('max', Limits(max_width=200), (200, 133)),        # example 1: "Assuming ... a maxWidth of 200px"
    ('^max', Limits(max_width=360), (360, 240)),       # example 1: "Assuming ... a maxWidth of 360px"
    ('150,', NONE, (150, 100)),                        # example 2
    ('^360,', BOUND, (360, 240)),                      # example 2
    (',150', NONE, (225, 150)),                        # example 3
    ('^,240', BOUND, (360, 240)),                      # example 3 as the form table writes it
    ('pct:50', NONE, (150, 100)),                      # example 4
    ('^pct:120', BOUND, (360, 240)),                   # example 4 with the caret the rule needs
    ('225,100', NONE, (225, 100)),                     # example 5, distorted
    ('^360,360', BOUND, (360, 360)),                   # example 5
    ('!225,100', NONE, (150, 100)),                    # example 6: "Returned image is 150,100 px"
    ('^!360,360', BOUND, (360, 240)),                  # example 6: "Returned image is 360,240 px"
    ('300,200', NONE, (300, 200)),
    ('pct:100', NONE, (300, 200)),
    ('1,', NONE, (1, 1)),
    ('!1000,1000', NONE, (300, 200)),                  # "not larger than the extracted region"
    ('!1000,1000', BOUND, (300, 200)),
    ('^300,', NONE, (300, 200)),                       # ^ that needs no upscaling is served without sizeUpscaling
    ('^pct:50', NONE, (150, 100)),
    ('^max', NONE, (300, 200)),                        # no limit declared: the largest permitted is the region
    ('^!200,200', NONE, (200, 133)),
    ('max', Limits(max_width=200, max_height=100), (150, 100)),
    ('max', Limits(max_area=6000), (94, 63)),
    ('^max', Limits(max_area=240000), (600, 400)),
    ('^max', Limits(max_width=1000, max_height=300), (450, 300)),
    ('^!1000,1000', Limits(max_area=60000), (300, 200)),
    ('200,', Limits(max_width=200), (200, 133)),
    ('^!1000,100', BOUND, (150, 100)),                 # the box's height binds
    ('^!300,1000', NONE, (300, 200)),                  # ^ that fits the region exactly needs no upscaling
    ('^!1000,200', NONE, (300, 200)),
]


@pytest.mark.parametrize('size, limits, expected', SIZES_3)
def test_a_3_0_size_resolves_to_the_output_pixels(size, limits, expected):
    assert parse(3, size=size, limits=limits).size == expected


REFUSED_SIZES_3 = [
    ('full', BOUND, 400),             # "the value full is no longer allowed for the size parameter"
    ('360,', BOUND, 400),             # "MUST NOT be greater than the width of the extracted region"
    (',201', BOUND, 400),
    ('301,200', BOUND, 400),
    ('300,201', BOUND, 400),
    ('pct:120', BOUND, 400),          # the example table omits the caret; the rule: "MUST NOT be greater than 100"
    ('pct:100.0000000001', BOUND, 400),
    ('0,', NONE, 400), (',0', NONE, 400), ('0,0', NONE, 400), ('!0,10', NONE, 400), ('!10,0', NONE, 400),
    ('pct:0', NONE, 400), ('pct:0.1', NONE, 400),  # 0.3 x 0.2 px: "MUST NOT be less than 1 pixel"
    ('^360,', NONE, 501),             # upscaling without sizeUpscaling: "SHOULD result in a 501"
    ('^pct:120', NONE, 501),          # the specification's own example of a 501
    ('^300,201', NONE, 501),
    ('^!360,360', NONE, 501),
    ('^401,', BOUND, 400),            # beyond maxWidth: "greater than the server-imposed limits ... 400"
    ('^,268', BOUND, 400),            # its width would be 402
    ('^pct:1000000000', BOUND, 400),
    ('250,', Limits(max_width=200), 400),
    ('150,150', Limits(max_width=200, max_height=100), 400),
    ('150,', Limits(max_area=6000), 400),
    (',^240', BOUND, 400),            # how the example table misprints ^,240: not the grammar
    ('^^max', BOUND, 400), ('^', BOUND, 400), ('^full', BOUND, 400), ('!^360,360', BOUND, 400), ('^!max', BOUND, 400),
]


@pytest.mark.parametrize('size, limits, expected', REFUSED_SIZES_3)
def test_a_3_0_size_that_may_not_be_served_gets_the_specifications_status(size, limits, expected):
    assert status(3, size=size, limits=limits) == expected


def test_a_best_fit_wider_than_the_region_though_as_high_needs_upscaling():
    """^!11,100 of a 10 x 3 image is 11 x 3: wider than the region, so a 501 without sizeUpscaling."""
    assert status(3, size='^!11,100', image=(10, 3)) == 501


def test_a_3_0_size_larger_than_a_cropped_region_is_judged_against_the_region_not_the_image():
    """/125,15,120,140/121,/0/default.jpg: the region is 120 wide, so 121 would upscale."""
    assert status(3, region='125,15,120,140', size='121,', limits=BOUND) == 400


# Size, 2.1 (section 4.2) #############################################################################

SIZES_2 = [
    ('full', NONE, (300, 200)),                        # example 1
    ('max', NONE, (300, 200)),                         # "the same as full if none of these properties are provided"
    ('max', Limits(max_width=200), (200, 133)),        # example 1: "Assuming ... a maxWidth of 200px"
    ('150,', NONE, (150, 100)),                        # example 2
    (',150', NONE, (225, 150)),                        # example 3
    ('pct:50', NONE, (150, 100)),                      # example 4
    ('225,100', NONE, (225, 100)),                     # example 5
    ('!225,100', NONE, (150, 100)),                    # example 6: "Returned image is 150,100 px"
    ('360,', BOUND, (360, 240)),                       # sizeAboveFull, declared when a limit bounds it
    ('pct:120', BOUND, (360, 240)),
    ('360,360', BOUND, (360, 360)),
    ('!360,360', BOUND, (360, 240)),
    ('!360,360', NONE, (300, 200)),                    # without sizeAboveFull the best fit stops at full
    ('max', Limits(max_area=6000), (94, 63)),
    ('!1000,100', BOUND, (150, 100)),                  # the box's height binds
]


@pytest.mark.parametrize('size, limits, expected', SIZES_2)
def test_a_2_1_size_resolves_to_the_output_pixels(size, limits, expected):
    assert parse(2, size=size, limits=limits).size == expected


REFUSED_SIZES_2 = [
    ('0,', NONE, 400), (',0', NONE, 400), ('pct:0', NONE, 400), ('!0,10', NONE, 400),  # "height or width is zero"
    ('360,', NONE, 501),              # above full without sizeAboveFull: a valid request not implemented
    ('pct:120', NONE, 501),
    ('300,201', NONE, 501),
    ('250,', Limits(max_width=200), 404),   # error table: "the requested size is greater than the limits specified"
    ('full', Limits(max_width=200), 404),
    ('401,', BOUND, 404),
    ('^360,', BOUND, 400),            # 2.1 has no caret
    ('^max', BOUND, 400),
    ('^pct:50', BOUND, 400),
]


@pytest.mark.parametrize('size, limits, expected', REFUSED_SIZES_2)
def test_a_2_1_size_that_may_not_be_served_gets_the_specifications_status(size, limits, expected):
    assert status(2, size=size, limits=limits) == expected


HOSTILE_SIZES = [
    '', ',', ',,', '1,2,3', 'Max', 'max ', 'pct:', 'pct:-1', 'pct:nan', 'pct:inf', 'pct:1e2', 'pct:+50',
    '!', '!,', '!1,', '!,1', '!1,2,3', '!!1,1', '+150,', '-150,', '1e2,', '150.0,', '\u0661\u0665\u0660,',
    '150,/0', 'max/0', '1' + '0' * 30 + ',', ',' + '9' * 10, 'pct:' + '9' * 30, 'x' * 1_000_000,
]


@BOTH
@pytest.mark.parametrize('size', HOSTILE_SIZES)
def test_a_size_outside_the_grammar_is_a_400(version, size):
    assert status(version, size=size, limits=BOUND) == 400


def test_an_extreme_aspect_ratio_still_gets_at_least_one_pixel_at_max():
    """/full/max/0/default.jpg of a 100000 x 1 image with maxWidth 1000: 1000 x 1, not 1000 x 0."""
    assert parse(3, image=(100000, 1), limits=Limits(max_width=1000)).size == (1000, 1)


@BOTH
def test_a_max_area_below_the_aspect_ratio_still_gets_one_pixel_high_at_max(version):
    """/full/max/0/default.jpg of a 100 x 1 image with maxArea 5: 5 x 1."""
    assert parse(version, image=(100, 1), limits=Limits(max_area=5)).size == (5, 1)


@BOTH
def test_max_width_alone_bounds_the_height_too(version):
    """/full/max/0/default.jpg of a 200 x 300 image, maxWidth 200: "clients should infer that maxHeight = maxWidth"."""
    assert parse(version, image=(200, 300), limits=Limits(max_width=200)).size == (133, 200)


@pytest.mark.parametrize('image', [(0, 200), (300, 0), (0, 0), (300.0, 200), (300, '200'), (True, 200)])
def test_an_image_size_that_is_not_two_positive_whole_numbers_is_a_programming_error(image):
    with pytest.raises(ValueError, match='^the image size must be positive whole numbers$'):
        iiif.parse_request(3, 'full', 'max', '0', 'default.jpg', *image)


def test_a_limits_object_with_max_height_and_no_max_width_is_refused():
    """3.0 section 5.2: "maxWidth MUST be specified if maxHeight is specified"."""
    with pytest.raises(ValueError):
        Limits(max_height=100)


AREA_SIZES = [                     # (region, maxArea, ^max)
    ((1, 1), 2, (1, 1)),           # a square stays square, though 2 x 1 is within the area
    ((4, 5), 2, (1, 1)),           # 1 x 1 is nearer 4:5 than 1 x 2
    ((2, 4), 8, (2, 4)),           # a tall region as large as the area
    ((4, 5), 10, (2, 2)),          # the height 2 the area allows at 4:5; the width 2 x 4 / 5, rounded down
    ((10, 1), 3, (3, 1)),          # one pixel high: as wide as the area allows
    ((1, 10), 3, (1, 3)),          # one pixel wide: as high as the area allows
]


@pytest.mark.parametrize('image, area, expected', AREA_SIZES)
def test_max_within_max_area_is_whole_pixels_at_the_aspect_ratio_rounded_down(image, area, expected):
    size = parse(3, size='^max', image=image, limits=Limits(max_area=area)).size
    assert size == expected and [type(side) for side in size] == [int, int]


def test_a_best_fit_exactly_at_max_area_is_served_as_fitted_not_shrunk():
    """!150,150 of a 301 x 200 image is 150 x 100, 15000 pixels: within a maxArea of 15000."""
    assert parse(3, size='!150,150', image=(301, 200), limits=Limits(max_area=15000)).size == (150, 100)


@BOTH
def test_an_extreme_tall_aspect_ratio_still_gets_one_pixel_wide_at_max(version):
    """/full/max/0/default.jpg of a 1 x 100000 image with maxWidth (so maxHeight) 1000: 1 x 1000, not 0 or 2 wide."""
    assert parse(version, image=(1, 100000), limits=Limits(max_width=1000)).size == (1, 1000)


@pytest.mark.parametrize('version, feature', [(3, 'sizeUpscaling'), (2, 'sizeAboveFull')])
def test_a_size_needing_upscaling_not_offered_is_a_501_naming_the_feature(version, feature):
    with pytest.raises(IIIFError) as refused:
        parse(version, size='^360,' if version == 3 else '360,')
    assert (refused.value.status, refused.value.reason) == (501, f'Upscaling ({feature}) is not supported by this '
                                                                 'server.')


# Rotation (3.0 and 2.1 section 4.3) ##################################################################

ROTATIONS = [
    ('0', (False, 0.0)),          # example 1
    ('180', (False, 180.0)),      # example 2
    ('90', (False, 90.0)),        # example 3
    ('22.5', (False, 22.5)),      # example 4
    ('!0', (True, 0.0)),          # example 5
    ('!180', (True, 180.0)),      # example 6
    ('!345', (True, 345.0)),      # order of implementation example
    ('270', (False, 270.0)),
    ('360', (False, 0.0)),        # "from 0 up to 360": 360 is a full turn
    ('!360', (True, 0.0)),
    ('359.9999999999', (False, 359.9999999999)),
    ('0.5', (False, 0.5)),
    ('.5', (False, 0.5)),
    ('5.', (False, 5.0)),
    ('00090', (False, 90.0)),
    ('90.000', (False, 90.0)),
]


@BOTH
@pytest.mark.parametrize('rotation, expected', ROTATIONS)
def test_a_rotation_resolves_to_mirroring_and_degrees(version, rotation, expected):
    plan = parse(version, rotation=rotation)
    assert (plan.mirror, plan.rotation) == expected


REFUSED_ROTATIONS = [
    '360.0001', '360.0000000001', '361', '720', '-90', '+90', '-0', 'NaN', 'nan', '!NaN', 'inf', '-inf',
    '1e2', '9e999', '', '!', '!!0', '!-0', ' 90', '90 ', '\u0669\u0660', '\uff19\uff10', '90/0', '90,0',
    '1' + '0' * 30, '0.12345678901', '1234567890', 'x' * 1_000_000, '0!',
]


@BOTH
@pytest.mark.parametrize('rotation', REFUSED_ROTATIONS)
def test_a_rotation_out_of_range_or_outside_the_grammar_is_a_400(version, rotation):
    assert status(version, rotation=rotation) == 400


# Quality and format (sections 4.4, 4.5) ##############################################################

QUALITY_FORMATS = [
    ('default.jpg', ('color', 'jpg')),   # "the server's default quality": the image as it is
    ('color.jpg', ('color', 'jpg')),
    ('gray.jpg', ('gray', 'jpg')),
    ('bitonal.jpg', ('bitonal', 'jpg')),
    ('default.png', ('color', 'png')),
    ('gray.webp', ('gray', 'webp')),
]


@BOTH
@pytest.mark.parametrize('quality_format, expected', QUALITY_FORMATS)
def test_a_quality_and_format_resolve(version, quality_format, expected):
    plan = parse(version, quality_format=quality_format)
    assert (plan.quality, plan.format) == expected


REFUSED_QUALITY_FORMATS = [
    'default.tif', 'default.gif', 'default.jp2', 'default.pdf',   # "A format value that is unsupported ... 400"
    'default.jpeg', 'default.JPG', 'Default.jpg', 'grey.jpg', 'native.jpg', 'default', 'default.', '.jpg',
    'default.jpg.png', 'default..jpg', 'default.jpg ', 'default.jpg/x', '', '.', 'x' * 1_000_000,
]


@BOTH
@pytest.mark.parametrize('quality_format', REFUSED_QUALITY_FORMATS)
def test_an_unsupported_quality_or_format_is_a_400(version, quality_format):
    assert status(version, quality_format=quality_format) == 400


@pytest.mark.parametrize('fmt, content_type', [('jpg', 'image/jpeg'), ('png', 'image/png'), ('webp', 'image/webp')])
def test_a_plans_content_type_is_the_specifications_mime_type_for_its_format(fmt, content_type):
    assert parse(3, quality_format=f'default.{fmt}').content_type == content_type


@pytest.mark.parametrize('fmt, saver', [('jpg', 'jpegsave'), ('png', 'pngsave'), ('webp', 'webpsave')])
def test_each_format_names_its_libvips_saver(fmt, saver):
    assert iiif.FORMATS[fmt].vips_saver == saver


# A whole request (section 4.6) ######################################################################

@BOTH
def test_the_order_of_implementation_example_resolves_every_parameter(version):
    """.../125,15,120,140/90,/!345/gray.jpg: region, then 90 wide keeping its aspect, mirrored, 345 degrees, gray."""
    plan = parse(version, region='125,15,120,140', size='90,', rotation='!345', quality_format='gray.jpg')
    assert plan == Plan((125, 15, 120, 140), (90, 105), True, 345.0, 'gray', 'jpg')


# Totality ###########################################################################################

def grammar_like():
    """Text that is often almost a parameter, so the deeper rules are reached, not only the first regex."""
    numbers = st.one_of(st.integers(0, 10 ** 12).map(str), st.sampled_from(HOSTILE_NUMBERS + HOSTILE_DECIMALS),
                        st.decimals(0, 10 ** 4, places=3, allow_nan=False).map(str))
    prefixes = st.sampled_from(['', '^', '!', '^!', 'pct:', '^pct:'])
    joined = st.tuples(prefixes, st.lists(st.one_of(numbers, st.just('')), min_size=1, max_size=5)).map(
        lambda parts: parts[0] + ','.join(parts[1]))
    words = st.sampled_from(['full', 'square', 'max', '^max', 'default.jpg', 'gray.png', 'color.webp', 'bitonal.tif'])
    return st.one_of(st.text(max_size=40), joined, words, numbers)


SIDES = st.one_of(st.integers(1, 10), st.integers(1, 100000))        # small ones reach the one-pixel edges
LIMITS = st.one_of(st.just(NONE), st.builds(Limits, max_width=st.one_of(st.none(), SIDES),
                                            max_area=st.one_of(st.none(), st.integers(1, 100),
                                                               st.integers(1, 10 ** 7))),
                   st.builds(Limits, max_width=SIDES, max_height=SIDES))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.sampled_from([3, 2]), region=grammar_like(), size=grammar_like(), rotation=grammar_like(),
       quality_format=grammar_like(), image=st.tuples(SIDES, SIDES), limits=LIMITS)
def test_any_parameters_give_a_plan_within_the_image_and_limits_or_the_error_class(
        version, region, size, rotation, quality_format, image, limits):
    try:
        plan = iiif.parse_request(version, region, size, rotation, quality_format, *image, limits)
    except IIIFError as refused:
        assert refused.status in ({400, 501} if version == 3 else {400, 404, 501})
        return
    assert_within(plan, image, limits)
    assert 0 <= plan.rotation < 360 and plan.format in iiif.FORMATS


def assert_within(plan, image, limits):
    """The region lies in the image; the size is at least a pixel, within the limits, upscaled only if offered."""
    x, y, rw, rh = plan.region
    w, h = plan.size
    assert 0 <= x < x + rw <= image[0] and 0 <= y < y + rh <= image[1]
    assert w >= 1 and h >= 1 and limits.allow(w, h)
    assert limits.upscaling or (w <= rw and h <= rh)


SIZE_FORMS = st.builds(lambda caret, form, w, h, n: caret + form.format(w=w, h=h, n=n),
                       st.sampled_from(['', '^']),
                       st.sampled_from(['max', '!{w},{h}', '{w},', ',{h}', '{w},{h}', 'pct:{n}']),
                       SIDES, SIDES, st.decimals(0, 1000, places=2, allow_nan=False))


@settings(max_examples=600, deadline=None)
@given(version=st.sampled_from([3, 2]), image=st.tuples(SIDES, SIDES), size=SIZE_FORMS, limits=LIMITS)
def test_any_size_of_the_grammar_gives_a_size_within_the_limits_or_the_error_class(version, image, size, limits):
    """The size arithmetic (fit to a box, to maxArea, at extreme aspect ratios) on the full region of any image."""
    try:
        plan = iiif.parse_request(version, 'full', size, '0', 'default.jpg', *image, limits)
    except IIIFError as refused:
        assert refused.status in ({400, 501} if version == 3 else {400, 404, 501})
        return
    assert_within(plan, image, limits)


# info.json (3.0 section 5, 2.1 section 5) ###########################################################

BASE = 'https://assets.example.org/iiif/3/a%20b.jpg'


TILED = Limits(max_width=1024)


def info(version, limits=TILED, **overrides):
    arguments = dict(width=6000, height=4000, tile_size=512, scale_factors=[1, 2, 4, 8, 16],
                     sizes=[(188, 125), (375, 250)], limits=limits)
    arguments.update(overrides)
    return iiif.info_document(version, BASE, **arguments)


def test_a_3_0_info_json_has_the_required_properties_with_context_first():
    doc = info(3)
    assert list(doc)[0] == '@context'
    assert {key: doc[key] for key in ('@context', 'id', 'type', 'protocol', 'profile', 'width', 'height')} == {
        '@context': 'http://iiif.io/api/image/3/context.json', 'id': BASE, 'type': 'ImageService3',
        'protocol': 'http://iiif.io/api/image', 'profile': 'level2', 'width': 6000, 'height': 4000}


def test_a_2_1_info_json_has_the_required_properties_and_the_level_2_uri_first_in_profile():
    doc = info(2)
    assert {key: doc[key] for key in ('@context', '@id', 'protocol', 'width', 'height')} == {
        '@context': 'http://iiif.io/api/image/2/context.json', '@id': BASE,
        'protocol': 'http://iiif.io/api/image', 'width': 6000, 'height': 4000}
    assert doc['profile'][0] == 'http://iiif.io/api/image/2/level2.json'


@BOTH
def test_info_json_describes_square_tiles_by_width_and_scale_factors(version):
    assert info(version)['tiles'] == [{'width': 512, 'scaleFactors': [1, 2, 4, 8, 16]}]


@BOTH
def test_info_json_gives_a_height_for_tiles_that_are_not_square(version):
    tiles = info(version, tile_size=(512, 256))['tiles']
    assert tiles == [{'width': 512, 'height': 256, 'scaleFactors': [1, 2, 4, 8, 16]}]


@BOTH
def test_info_json_lists_sizes_as_width_and_height_objects(version):
    assert info(version)['sizes'] == [{'width': 188, 'height': 125}, {'width': 375, 'height': 250}]


def test_a_3_0_info_json_declares_its_limits_at_the_top_level():
    doc = info(3, limits=Limits(max_width=3000, max_height=2000, max_area=4000000))
    assert (doc['maxWidth'], doc['maxHeight'], doc['maxArea']) == (3000, 2000, 4000000)


def test_a_2_1_info_json_declares_its_limits_in_the_profile_object():
    profile = info(2, limits=Limits(max_width=3000, max_area=4000000))['profile'][1]
    assert (profile['maxWidth'], profile['maxArea'], 'maxHeight' in profile) == (3000, 4000000, False)


def test_a_3_0_info_json_links_the_manifest_it_is_part_of():
    doc = info(3, manifest='https://assets.example.org/iiif/manifest/a.json')
    assert doc['partOf'] == [{'id': 'https://assets.example.org/iiif/manifest/a.json', 'type': 'Manifest'}]


@BOTH
def test_info_json_takes_extra_properties_but_not_in_place_of_its_own(version):
    assert info(version, extra={'rights': 'http://rightsstatements.org/vocab/InC/1.0/'})['rights'].startswith('http')
    with pytest.raises(ValueError):
        info(version, extra={'width': 1})


@BOTH
@pytest.mark.parametrize('sizes, limits', [([(6001, 4000)], NONE), ([(6000, 4001)], NONE), ([(0, 1)], NONE),
                                           ([(1025, 683)], TILED)])
def test_info_json_refuses_to_advertise_a_size_it_would_not_serve(version, sizes, limits):
    """A size beyond the image would need upscaling (3.0 w,h without ^); 1025 wide is beyond maxWidth 1024."""
    with pytest.raises(ValueError):
        info(version, sizes=sizes, limits=limits)


@BOTH
def test_info_json_refuses_tiles_beyond_the_limits(version):
    """"Servers MUST ensure that sizes specified by any sizes or tiles properties are within any size limits"."""
    with pytest.raises(ValueError):
        info(version, tile_size=512, sizes=[], limits=Limits(max_width=256))


def tile_requests(width, height, tw, th, factors):
    """Every tile's region and size, by the tile algorithm of 2.1 Appendix A (3.0 implementation notes)."""
    for s in factors:
        for yr in range(0, height, th * s):
            for xr in range(0, width, tw * s):
                wr, hr = min(tw * s, width - xr), min(th * s, height - yr)
                yield (xr, yr, wr, hr), (-(-wr // s), -(-hr // s))


@settings(max_examples=60, deadline=None)
@given(version=st.sampled_from([3, 2]), width=st.integers(1, 3000), height=st.integers(1, 3000),
       tile=st.sampled_from([(256, 256), (512, 512), (512, 256)]))
def test_every_tile_that_info_json_implies_is_a_request_that_parses_to_its_size(version, width, height, tile):
    factors = [1, 2, 4, 8]
    doc = iiif.info_document(version, BASE, width, height, tile, factors, [], TILED)
    entry = doc['tiles'][0]
    tw, th = entry['width'], entry.get('height', entry['width'])
    for (x, y, w, h), (sw, sh) in tile_requests(width, height, tw, th, entry['scaleFactors']):
        plan = parse(version, region=f'{x},{y},{w},{h}', size=f'{sw},{sh}', image=(width, height), limits=TILED)
        assert (plan.region, plan.size) == ((x, y, w, h), (sw, sh))


@BOTH
def test_every_size_info_json_lists_is_a_full_region_request_that_parses_to_it(version):
    for entry in info(version)['sizes']:
        plan = parse(version, size=f"{entry['width']},{entry['height']}", image=(6000, 4000), limits=TILED)
        assert plan.size == (entry['width'], entry['height'])


# Declared features: each one declared beyond level 2 parses, each one not declared is refused. ######

LEVEL2_FEATURES = {      # from the profile documents image/3/level2.json and image/2/level2.json
    3: {'baseUriRedirect', 'cors', 'jsonldMediaType', 'regionByPct', 'regionByPx', 'regionSquare', 'rotationBy90s',
        'sizeByConfinedWh', 'sizeByH', 'sizeByPct', 'sizeByW', 'sizeByWh'},
    2: {'baseUriRedirect', 'cors', 'jsonldMediaType', 'regionByPct', 'regionByPx', 'rotationBy90s', 'sizeByWhListed',
        'sizeByConfinedWh', 'sizeByDistortedWh', 'sizeByForcedWh', 'sizeByH', 'sizeByPct', 'sizeByW', 'sizeByWh'},
}
LEVEL2_FORMATS = {3: {'jpg', 'png'}, 2: {'jpg', 'png'}}
LEVEL2_QUALITIES = {3: {'default'}, 2: {'default', 'bitonal'}}
SPEC_FORMATS = {'jpg', 'tif', 'png', 'gif', 'jp2', 'pdf', 'webp'}       # section 4.5, both versions

FEATURE_REQUESTS = {     # a request (on the 300 x 200 image) that uses the feature
    'mirroring': dict(rotation='!0'),
    'rotationArbitrary': dict(rotation='22.5'),
    'rotationBy90s': dict(rotation='90'),
    'regionSquare': dict(region='square'),
    'regionByPx': dict(region='125,15,120,140'),
    'regionByPct': dict(region='pct:41.6,7.5,40,70'),
    'sizeByW': dict(size='150,'),
    'sizeByH': dict(size=',150'),
    'sizeByPct': dict(size='pct:50'),
    'sizeByConfinedWh': dict(size='!225,100'),
    'sizeByWh': dict(size='150,100'),
    'sizeByDistortedWh': dict(size='225,100'),
    'sizeUpscaling': dict(size='^360,'),
    'sizeAboveFull': dict(size='360,'),
}
URL_FEATURES = {3: set(FEATURE_REQUESTS) - {'sizeAboveFull', 'sizeByDistortedWh'},      # each version's own names
                2: set(FEATURE_REQUESTS) - {'sizeUpscaling'}}


def declared(version, doc):
    """(features, formats, qualities) the document declares, the level 2 profile's included."""
    if version == 3:
        return (LEVEL2_FEATURES[3] | set(doc['extraFeatures']), LEVEL2_FORMATS[3] | set(doc['extraFormats']),
                LEVEL2_QUALITIES[3] | set(doc['extraQualities']))
    profile = doc['profile'][1]
    return (LEVEL2_FEATURES[2] | set(profile['supports']), LEVEL2_FORMATS[2] | set(profile['formats']),
            LEVEL2_QUALITIES[2] | set(profile['qualities']))


@BOTH
@pytest.mark.parametrize('limits', [NONE, TILED, Limits(max_area=10 ** 6)])
def test_every_feature_info_json_declares_is_a_request_that_parses(version, limits):
    features = declared(version, info(version, limits=limits))[0] & URL_FEATURES[version]
    for feature in sorted(features):
        assert isinstance(parse(version, limits=limits, **FEATURE_REQUESTS[feature]), Plan), feature


@BOTH
def test_every_feature_info_json_does_not_declare_is_refused(version):
    """Without limits upscaling is not declared ("a client MUST assume that the feature is not supported")."""
    missing = URL_FEATURES[version] - declared(version, info(version, limits=NONE))[0]
    assert missing
    for feature in sorted(missing):
        assert status(version, limits=NONE, **FEATURE_REQUESTS[feature]) == 501, feature


@BOTH
def test_upscaling_is_declared_when_a_limit_bounds_it(version):
    assert iiif.UPSCALING_FEATURE[version] in declared(version, info(version, limits=Limits(max_area=10 ** 6)))[0]


@BOTH
def test_upscaling_is_not_declared_without_a_limit_to_bound_it(version):
    assert iiif.UPSCALING_FEATURE[version] not in declared(version, info(version, limits=NONE))[0]


@BOTH
def test_every_declared_format_and_quality_parses(version):
    _, formats, qualities = declared(version, info(version))
    for quality in sorted(qualities):
        for fmt in sorted(formats):
            assert isinstance(parse(version, quality_format=f'{quality}.{fmt}'), Plan), (quality, fmt)


@BOTH
def test_every_format_of_the_specification_not_declared_is_a_400(version):
    missing = SPEC_FORMATS - declared(version, info(version))[1]
    assert missing == {'tif', 'gif', 'jp2', 'pdf'}
    for fmt in sorted(missing):
        assert status(version, quality_format=f'default.{fmt}') == 400, fmt


# Which answers are the tiles and sizes info.json offers (and so are kept once cut) ##################

ODD = (1201, 901)                   # tiles of 512 at scale factors 1, 2 and 4; sizes 1201x901, 601x451, 301x226


def offered(request, image=ODD):
    region, size, rotation, quality_format = request.split('/')
    plan = iiif.parse_request(3, region, size, rotation, quality_format, *image)
    return iiif.is_offered(plan, *image, *iiif.tile_grid(*image, 512))


@pytest.mark.parametrize('request_, answer', [
    ('full/1201,901/0/default.jpg', True),           # the full image at a size listed
    ('full/301,226/0/default.jpg', True),
    ('full/300,225/0/default.jpg', False),           # a size not listed
    ('0,0,601,451/601,451/0/default.jpg', False),    # a listed size, but not of the full image
    ('0,0,512,512/512,512/0/default.jpg', True),     # a tile at scale factor 1
    ('1024,512,177,389/177,389/0/default.jpg', True),   # the corner tile, cut at the image's edges
    ('1024,0,177,901/89,451/0/default.jpg', True),   # an edge tile at scale factor 2, its odd sides halved up
    ('0,0,1024,901/512,451/0/default.jpg', True),
    ('0,0,512,512/256,256/0/default.jpg', False),    # a tile at another size
    ('1,0,512,512/512,512/0/default.jpg', False),    # off the grid
    ('0,1,512,512/512,512/0/default.jpg', False),
    ('0,0,512,511/512,511/0/default.jpg', False),    # not the whole tile
    ('full/1201,901/90/default.jpg', False), ('full/1201,901/!0/default.jpg', False),
    ('full/1201,901/0/gray.jpg', False), ('full/1201,901/0/default.png', False),
    ('full/1201,901/0/color.jpg', True),             # default is color
])
def test_only_the_tiles_and_sizes_info_json_offers_unturned_in_colour_as_jpeg_are_offered_answers(request_, answer):
    assert offered(request_) is answer


# Identifiers ########################################################################################

COLLECTIONS = {'KU Fish': 'fish', 'a/b~c': 'odd', 'Herbier de l\'Université': 'herb', 'x\x00y': 'nul'}


@pytest.mark.parametrize('name, identifier', [('a b.jpg', 'a%20b.jpg'), ('100%.jpg', '100%25.jpg'),
                                              ('sp6-01.jpg', 'sp6-01.jpg'), ('é?#.png', '%C3%A9%3F%23.png')])
def test_without_collection_dirs_the_identifier_is_the_name_percent_encoded(name, identifier):
    assert iiif.identifier_for(None, name, None) == identifier


@pytest.mark.parametrize('name', ['a b.jpg', '100%.jpg', 'é?#.png', '...', 'a%2Fb.jpg'])
def test_without_collection_dirs_the_decoded_identifier_names_the_attachment(name):
    assert iiif.name_for(unquote(iiif.identifier_for(None, name, None)), None) == (None, name)


@pytest.mark.parametrize('segment', ['', '.', '..', 'a/b.jpg', 'a\\b.jpg', 'a\x00.jpg', 'x' * 256,
                                     TEMP_PREFIX + 'upload', None])
def test_without_collection_dirs_a_segment_no_attachment_can_be_named_is_a_404(segment):
    with pytest.raises(IIIFError) as refused:
        iiif.name_for(segment, None)
    assert (refused.value.status, refused.value.reason) == (404, 'No such image.')


def test_an_identifier_for_a_collection_not_configured_is_refused_as_a_programming_error():
    with pytest.raises(ValueError, match='^an identifier names a collection of COLLECTION_DIRS$'):
        iiif.identifier_for('Elsewhere', 'a.jpg', COLLECTIONS)


@pytest.mark.parametrize('coll', sorted(COLLECTIONS))
def test_with_collection_dirs_an_identifier_is_url_safe_and_names_its_collection_and_attachment(coll):
    identifier = iiif.identifier_for(coll, 'a b_..é.jpg', COLLECTIONS)
    assert set(identifier) <= set(string.ascii_letters + string.digits + '-_')
    assert iiif.name_for(identifier, COLLECTIONS) == (coll, 'a b_..é.jpg')


def b64(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b'=').decode('ascii')


NOT_IDENTIFIERS = [
    b64(b'KU Fish\x00a.jpg') + '=',         # padded: another spelling of the same bytes
    b64(b'KU Fish\x00a.jpg')[:-1] + 'x',    # the last character's unused bits set: decodes alike
    base64.b64encode(b'KU Fish\x00>>>.jpg').decode(),   # the standard alphabet's '+' for '-'
    b64(b'Elsewhere\x00a.jpg'),             # a collection COLLECTION_DIRS does not name
    b64(b'KU Fish a.jpg'),                  # no NUL
    b64(b'KU Fish\x00..'), b64(b'KU Fish\x00'), b64(b'KU Fish\x00' + TEMP_PREFIX.encode() + b'x'),
    b64(b'KU Fish\x00a\\b'), b64(b'KU Fish\x00' + b'x' * 256),
    b64(b'KU Fish\x00\xff.jpg'),            # not UTF-8
    'a', '', '!!!!', 'a b', 'a/b', 'A' * 5000, None,
]


@pytest.mark.parametrize('identifier', NOT_IDENTIFIERS)
def test_with_collection_dirs_an_identifier_that_is_not_the_one_spelling_of_an_attachment_is_a_404(identifier):
    with pytest.raises(IIIFError) as refused:
        iiif.name_for(identifier, COLLECTIONS)
    assert (refused.value.status, refused.value.reason) == (404, 'No such image.')


NAMES = st.text(min_size=1, max_size=80).filter(lambda name: name_problem(name) is None)


@settings(max_examples=200, deadline=None)
@given(coll=st.sampled_from(sorted(COLLECTIONS)), name=NAMES)
def test_with_collection_dirs_any_attachment_round_trips_through_its_identifier(coll, name):
    assert iiif.name_for(iiif.identifier_for(coll, name, COLLECTIONS), COLLECTIONS) == (coll, name)


@settings(max_examples=300, deadline=None)
@given(identifier=st.one_of(st.text(max_size=60), st.text(string.ascii_letters + string.digits + '-_=', max_size=60),
                            st.binary(max_size=40).map(b64)))
def test_with_collection_dirs_any_segment_names_a_valid_attachment_by_its_one_identifier_or_is_a_404(identifier):
    try:
        coll, name = iiif.name_for(identifier, COLLECTIONS)
    except IIIFError as refused:
        assert refused.status == 404
        return
    assert name_problem(name) is None and coll in COLLECTIONS
    assert iiif.identifier_for(coll, name, COLLECTIONS) == identifier
